"""Run a `model.onnx` from the onnx target in onnxruntime, one step at a time.

Each call feeds `input_ids` and `position_ids` for its tokens and the caches the previous
call returned (`present.*` become the next `past_key_values.*`), as onnxruntime-genai does;
a prompt is one call (up to the cache length minus one), its last logits row is returned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import SlmcError

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class ONNXSession:
    def __init__(self, path: Path, max_len: int, provider: str = "CPUExecutionProvider"):
        import onnxruntime as ort

        self.path, self.max_len = Path(path), max_len
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # warnings about unused initializers etc. are not the user's
        try:
            self.sess = ort.InferenceSession(str(self.path), opts, providers=[provider])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph exceptions
            raise SlmcError(f"onnxruntime could not load the model: {e}", str(self.path)) from None
        self.runtime = "onnxruntime" if provider == "CPUExecutionProvider" else f"onnxruntime ({provider})"
        self.past = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.present = [n.replace("past_key_values.", "present.") for n in (i.name for i in self.past)]
        self.reset()

    def reset(self) -> None:
        self.caches = {i.name: np.zeros(i.shape, _DTYPES[i.type]) for i in self.past}

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        return self.step_all(tokens, start_pos)[-1]

    def step_all(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Logits of every position, [T, vocab]: the graph returns every row."""
        if not tokens:
            raise SlmcError("step() needs at least one token", str(self.path))
        end = start_pos + len(tokens)
        if end > self.max_len:
            raise SlmcError(f"{end} positions exceed the KV cache of {self.max_len}", str(self.path))
        feeds = {"input_ids": np.array([tokens], dtype=np.int64),
                 "position_ids": np.arange(start_pos, end, dtype=np.int64)[None], **self.caches}
        out = self.sess.run(["logits", *self.present], feeds)
        self.caches = {i.name: c for i, c in zip(self.past, out[1:])}
        return torch.from_numpy(np.ascontiguousarray(out[0][0]))


def open_onnx(folder: Path, manifest: dict) -> ONNXSession:
    import onnxruntime as ort

    folder = Path(folder)
    try:
        name, max_len = manifest["artifact"], manifest["kv_cache"]["max_len"]
    except (KeyError, TypeError) as e:
        raise SlmcError(f"manifest lacks the onnx target's field {e}", str(folder / "manifest.json")) from None
    if not (folder / name).is_file():
        raise SlmcError(f"artifact file {name} is missing", str(folder))
    # the backend's execution provider where this onnxruntime has it, else the CPU one (the
    # graph is the same file; an EP only changes which kernels run it)
    ep = (manifest.get("execution_provider") or {}).get("ort_name")
    provider = ep if ep in ort.get_available_providers() else "CPUExecutionProvider"
    return ONNXSession(folder / name, max_len, provider)
