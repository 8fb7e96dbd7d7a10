#!/usr/bin/env python3
"""Run on a device by `slmc validate --by-block --on DEVICE` (LiteRT artifacts): the debug
model's hidden states of one prompt, and the artifact's own last logits row on that prompt.

    python3 litert_states.py DEBUG.tflite IDS.npz OUT.npz ART_DIR

DEBUG.tflite: the debug model the host converted from the artifact's IR with its components
(signature `debug` over the whole prompt; outputs: every row's logits and the hidden states
[depths + 2, T, hidden]); IDS.npz: `ids` (int64); ART_DIR: the artifact folder with its check/
bundle, whose own checker session (check/check.py: prefill + decode signatures) runs the artifact
on the same ids. Needs only the LiteRT interpreter and numpy, as check/check.py does. Writes
OUT.npz (states, logits, own_last, seconds) and prints one JSON line.
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
    spec = importlib.util.spec_from_file_location("slmc_checker", Path(art) / "check" / "check.py")
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    runner = checker._interpreter()(model_path=str(debug)).get_signature_runner("debug")
    caches = {n: np.zeros(d["shape"], d["dtype"]) for n, d in runner.get_input_details().items()
              if n.startswith("kv_cache_")}
    T = len(ids)
    res = runner(tokens=np.array([ids], np.int32), input_pos=np.arange(T, dtype=np.int32), **caches)
    states, logits = np.array(res["hidden_states"], np.float32), np.array(res["logits"], np.float32).reshape(T, -1)
    t_debug = time.time() - t0
    manifest = json.loads((Path(art) / "manifest.json").read_text())
    own = checker.open_session(Path(art), manifest).step(ids, 0)
    np.savez(out, states=states, logits=logits, own_last=np.asarray(own, np.float32).reshape(-1),
             seconds=np.array(time.time() - t0))
    print(json.dumps({"runtime": "ai_edge_litert", "debug_seconds": round(t_debug, 2),
                      "seconds": round(time.time() - t0, 2), "states": list(states.shape)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
