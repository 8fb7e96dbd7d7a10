#!/usr/bin/env python3
"""Run on a device by `slmc validate --by-block --on DEVICE` (ExecuTorch artifacts): the debug
program's hidden states of one prompt, and the artifact's own last logits row on that prompt.

    python3 et_states.py DEBUG.pte IDS.npz OUT.npz ART_DIR

DEBUG.pte: the debug .pte the host compiled from the artifact's IR with its spec (outputs: every
row's logits, then the hidden states [depths + 2, T, hidden]); IDS.npz: `ids` (int64); ART_DIR:
the artifact folder with its check/ bundle, whose own checker session (check/check.py) runs the
artifact's .pte on the same ids. Needs only ExecuTorch's runtime pybindings, torch and numpy, as
check/check.py does. Writes OUT.npz (states, logits, own_last, seconds) and prints one JSON line.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    debug, ids_file, out, art = sys.argv[1:5]
    t0 = time.time()
    with np.load(ids_file) as f:  # arrays only: np.load refuses pickles by default
        ids = [int(t) for t in f["ids"]]
    # the artifact's own checker: its session loads torch, ExecuTorch's pybindings and the
    # quantized kernels the debug program needs too
    spec = importlib.util.spec_from_file_location("slmc_checker", Path(art) / "check" / "check.py")
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    torch, et = checker.torch, checker.et
    args = [torch.tensor([ids], dtype=torch.int64), torch.zeros(1, dtype=torch.int64)]
    outputs = et._load_for_executorch(str(debug)).forward(args)
    logits, states = outputs[0], outputs[-1]
    t_debug = time.time() - t0
    manifest = json.loads((Path(art) / "manifest.json").read_text())
    own = checker.open_session(Path(art), manifest).step(ids, 0)
    np.savez(out, states=states.float().numpy(), logits=logits.reshape(len(ids), -1).float().numpy(),
             own_last=np.asarray(own, np.float32).reshape(-1), seconds=np.array(time.time() - t0))
    print(json.dumps({"runtime": "executorch", "debug_seconds": round(t_debug, 2),
                      "seconds": round(time.time() - t0, 2), "states": list(states.shape)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
