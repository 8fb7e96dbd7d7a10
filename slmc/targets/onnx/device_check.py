#!/usr/bin/env python3
"""Check this model.onnx on the device with onnxruntime and numpy only.

Run from anywhere: `python3 check/check.py [RESULT.npz [RUN.npz]]` (RUN.npz: the host's
teacher-forced windows and greedy prompt that `slmc validate --on` pushes; common.py runs
them). Each call feeds `input_ids`,
`position_ids` and the caches the previous call returned (`present.*` become the next
`past_key_values.*`), as slmc's host session and onnxruntime-genai do; prints a JSON report
and exits 0 when the logits are within the bounds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main  # noqa: E402

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class Session:
    runtime = "onnxruntime"

    def __init__(self, path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.present = [i.name.replace("past_key_values.", "present.") for i in self.past]
        self.reset()

    def reset(self):
        self.caches = {i.name: np.zeros(i.shape, _DTYPES[i.type]) for i in self.past}

    def step(self, tokens, start_pos):
        return self.step_all(tokens, start_pos)[-1]

    def step_all(self, tokens, start_pos):
        """Every row's logits: the graph returns them all (one call per window)."""
        feeds = {"input_ids": np.array([tokens], np.int64),
                 "position_ids": np.arange(start_pos, start_pos + len(tokens), dtype=np.int64)[None], **self.caches}
        out = self.sess.run(["logits", *self.present], feeds)
        self.caches = {i.name: c for i, c in zip(self.past, out[1:])}
        return np.asarray(out[0][0], np.float32)


def open_session(root: Path, manifest: dict) -> Session:
    return Session(root / manifest["artifact"])


if __name__ == "__main__":
    sys.exit(main(open_session))
