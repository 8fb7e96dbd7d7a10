#!/usr/bin/env python3
"""Check this .tflite on the device with the LiteRT interpreter and numpy only.

Run from anywhere: `python3 check/check.py [RESULT.npz [RUN.npz]]` (RUN.npz: the host's
teacher-forced windows and greedy prompt that `slmc validate --on` pushes; common.py runs
them). It feeds the bundle's prompt
through the `prefill` signature (chunks of the manifest's prefill_len, padded as LiteRT-LM
pads) and each next token through `decode`, carrying the KV cache tensors, as slmc's host
session does; prints a JSON report and exits 0 when the logits are within the bounds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main  # noqa: E402


def _interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the older standalone runtime
        from tflite_runtime.interpreter import Interpreter
    return Interpreter


class Session:
    runtime = "ai_edge_litert"

    def __init__(self, path: Path, prefill_len: int, max_len: int):
        it = _interpreter()(model_path=str(path))
        self.prefill, self.decode = it.get_signature_runner("prefill"), it.get_signature_runner("decode")
        self.P, self.max_len = prefill_len, max_len
        self.spec = {n: (tuple(d["shape"]), d["dtype"])
                     for n, d in self.decode.get_input_details().items() if n.startswith("kv_cache_")}
        self.reset()

    def reset(self):
        self.caches = {n: np.zeros(s, d) for n, (s, d) in self.spec.items()}

    def _run(self, runner, tokens, positions):
        out = runner(tokens=np.array([tokens], np.int32), input_pos=np.array(positions, np.int32), **self.caches)
        self.caches = {n: out[n] for n in self.spec}
        return out

    def step(self, tokens, start_pos):
        pos, rest = start_pos, list(tokens[:-1])
        while rest:
            n = min(self.P, len(rest))
            if pos + self.P > self.max_len:  # a padded chunk would run past the cache: token by token
                for t in rest:
                    self._run(self.decode, [t], [pos])
                    pos += 1
                break
            pad = self.P - n
            self._run(self.prefill, rest[:n] + [0] * pad, list(range(pos, pos + n)) + [0] * pad)
            rest, pos = rest[n:], pos + n
        logits = self._run(self.decode, [tokens[-1]], [pos])["logits"]
        return np.array(logits).reshape(-1, logits.shape[-1])[-1]


def open_session(root: Path, manifest: dict) -> Session:
    return Session(root / manifest["artifact"], manifest["prefill_len"], manifest["kv_cache"]["max_len"])


if __name__ == "__main__":
    sys.exit(main(open_session))
