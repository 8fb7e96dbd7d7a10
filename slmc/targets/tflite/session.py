"""Run a `.tflite` from the tflite target in the LiteRT interpreter, the way LiteRT-LM does.

Prompts go through the `prefill` signature in chunks of its fixed length (the last chunk
padded as LiteRT-LM pads: token 0, position 0) and the last token through `decode`, whose
logits are returned; the KV cache tensors are carried from each call's outputs to the next
call's inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import SlmcError


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the older standalone runtime (needs numpy 1.x)
        from tflite_runtime.interpreter import Interpreter
    return Interpreter


class TFLiteSession:
    runtime = "ai_edge_litert"

    def __init__(self, path: Path, prefill_len: int, max_len: int):
        self.path = Path(path)
        try:
            it = _interpreter_class()(model_path=str(self.path))
            self.prefill, self.decode = it.get_signature_runner("prefill"), it.get_signature_runner("decode")
        except Exception as e:  # the interpreter raises bare ValueErrors/RuntimeErrors
            raise SlmcError(f"LiteRT could not load the model: {e}", str(self.path)) from None
        self.interpreter, self.P, self.max_len = it, prefill_len, max_len
        self.cache_spec = {n: (tuple(d["shape"]), d["dtype"])
                           for n, d in self.decode.get_input_details().items() if n.startswith("kv_cache_")}
        self.reset()

    def reset(self) -> None:
        self.caches = {n: np.zeros(shape, dtype) for n, (shape, dtype) in self.cache_spec.items()}

    def _run(self, runner, tokens: list[int], positions: list[int]) -> dict:
        out = runner(tokens=np.array([tokens], dtype=np.int32), input_pos=np.array(positions, dtype=np.int32),
                     **self.caches)
        self.caches = {n: out[n] for n in self.cache_spec}
        return out

    def prefill_tokens(self, tokens: list[int], start_pos: int) -> int:
        """Write `tokens` into the cache from start_pos on; returns the next position."""
        pos, i = start_pos, 0
        while i < len(tokens):
            n = min(self.P, len(tokens) - i)
            if pos + self.P > self.max_len:  # a padded chunk would run past the cache: go token by token
                for t in tokens[i:]:
                    self._run(self.decode, [t], [pos])
                    pos += 1
                return pos
            pad = self.P - n
            self._run(self.prefill, tokens[i:i + n] + [0] * pad, list(range(pos, pos + n)) + [0] * pad)
            i, pos = i + n, pos + n
        return pos

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        if not tokens:
            raise SlmcError("step() needs at least one token", str(self.path))
        if start_pos + len(tokens) > self.max_len:
            raise SlmcError(f"{start_pos + len(tokens)} positions exceed the KV cache of {self.max_len}",
                            str(self.path))
        pos = self.prefill_tokens(list(tokens[:-1]), start_pos)
        logits = self._run(self.decode, [tokens[-1]], [pos])["logits"]
        return torch.from_numpy(np.array(logits).reshape(-1, logits.shape[-1])[-1].copy())

    def step_all(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Logits of every position: only the decode signature returns logits, so one token
        per call."""
        return torch.stack([self.step([t], start_pos + i) for i, t in enumerate(tokens)])


def open_tflite(folder: Path, manifest: dict) -> TFLiteSession:
    folder = Path(folder)
    try:
        name, P, max_len = manifest["artifact"], manifest["prefill_len"], manifest["kv_cache"]["max_len"]
    except (KeyError, TypeError) as e:
        raise SlmcError(f"manifest lacks the tflite target's field {e}", str(folder / "manifest.json")) from None
    if not (folder / name).is_file():
        raise SlmcError(f"artifact file {name} is missing", str(folder))
    return TFLiteSession(folder / name, P, max_len)
