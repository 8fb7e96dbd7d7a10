#!/usr/bin/env python3
"""Check this .pte on the device with ExecuTorch's runtime pybindings and numpy only.

Run from anywhere: `python3 check/check.py [RESULT.npz [RUN.npz]]` (RUN.npz: the host's
teacher-forced windows and greedy prompt that `slmc validate --on` pushes; common.py runs
them). With `check/model.bpte` (a
BundledProgram holding this .pte's bytes and one test case per step), ExecuTorch itself
first runs each case in order and checks it (`verify_result_with_bundled_expected_output`,
atol = the flow's max |Δ| bound); then the artifact's own .pte runs the same steps
(teacher-forced logits, judged for max |Δ| and top-1) and generates greedily. Prints a JSON report
and exits 0 when everything is within the bounds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, main  # noqa: E402

import torch  # noqa: E402  loads libtorch, which ExecuTorch's pybindings link

try:
    import executorch.kernels.quantized  # noqa: E402,F401  registers the quantized kernels
except ImportError:
    pass
from executorch.extension.pybindings import _C as et  # noqa: E402


class Session:
    runtime = "executorch"

    def __init__(self, pte: Path, max_chunk: int | None, data: Path | None = None):
        self.pte, self.max_chunk, self.data = pte, max_chunk, data
        bpte = HERE / "model.bpte"
        self.bundle = et._load_bundled_program_from_buffer(bpte.read_bytes()) if bpte.is_file() else None
        self.bounds = json.loads((HERE / "bounds.json").read_text())
        self.reset()

    def reset(self):
        # a tied table kept beside the .pte (manifest "data_file") is the program's external data
        self.module = et._load_for_executorch(str(self.pte), str(self.data) if self.data else None)

    def step(self, tokens, start_pos):
        n = self.max_chunk or len(tokens)
        for i in range(0, len(tokens), n):
            out = self.module.forward([torch.tensor([tokens[i:i + n]], dtype=torch.int64),
                                       torch.tensor([start_pos + i], dtype=torch.int64)])[0]
        return out.reshape(-1, out.shape[-1])[-1].float().numpy()

    def verify_bundle(self) -> dict:
        """ExecuTorch's own check of the BundledProgram: each test case's bundled inputs run
        in order on the bundle's program (this .pte's bytes; the KV cache carries over) and
        its output is compared with the bundled expected output (|Δ| <= atol, the flow's
        max |Δ| bound). {} without a bundle."""
        if self.bundle is None:
            return {}
        if self.bounds.get("rule") != "exact":  # ExecuTorch verifies elementwise: an exact bound only
            return {"bundled_program_skipped": f"the flow's bound is {self.bounds.get('rule')}, not elementwise"}
        verified = []
        for i in range(len(np.load(HERE / "expected.npz")["tokens"])):
            try:
                self.bundle.verify_result_with_bundled_expected_output(
                    "forward", i, rtol=0.0, atol=float(self.bounds["max_abs"]))
                verified.append(True)
            except RuntimeError:  # the runtime's word for a mismatch
                verified.append(False)
        return {"bundled_program_verified": verified}


def open_session(root: Path, manifest: dict) -> Session:
    ring = (manifest.get("kv_cache") or {}).get("ring")
    data = manifest.get("data_file")
    return Session(root / manifest["artifact"], ring["max_tokens_per_call"] if ring else None,
                   root / data if data else None)


if __name__ == "__main__":
    sys.exit(main(open_session))
