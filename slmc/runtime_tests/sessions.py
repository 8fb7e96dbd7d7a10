"""Run an artifact in its own runtime, one step at a time.

A session exposes `step(tokens, start_pos) -> logits of the last position` and
`reset()`. `open_session` picks the runtime from the manifest's format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..errors import SlmcError, UnsupportedError


class Session(Protocol):
    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor: ...

    def reset(self) -> None: ...


class ExecuTorchSession:
    """The .pte in ExecuTorch's runtime (pybindings), on this host's CPU."""

    runtime = "executorch"

    def __init__(self, pte: Path, max_chunk: int | None = None):
        import executorch.kernels.quantized  # noqa: F401  registers quantized kernels
        from executorch.runtime import Runtime

        self.pte, self.max_chunk = Path(pte), max_chunk
        try:
            self.program = Runtime.get().load_program(str(self.pte))
        except Exception as e:  # the runtime raises bare RuntimeErrors
            raise SlmcError(f"ExecuTorch could not load the program: {e}", str(self.pte)) from None
        self.reset()

    @classmethod
    def from_artifact(cls, folder: Path, manifest: dict) -> "ExecuTorchSession":
        if not manifest.get("host_runnable", True):
            raise UnsupportedError(
                f"a .pte for the {manifest.get('backend')} backend cannot run on this host "
                f"({manifest.get('backend_note', 'no delegate in this runtime')}); validate it on a device "
                "with ExecuTorch's runtime", str(folder))
        # a ring-buffer cache takes at most its non-sink slots per call, as the runner's prefill
        ring = manifest.get("kv_cache", {}).get("ring")
        return cls(Path(folder) / manifest["artifact"], ring["max_tokens_per_call"] if ring else None)

    def reset(self) -> None:
        # A fresh method gets fresh (zero-filled) planned memory, so an empty cache.
        self.method = self.program.load_method("forward")

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        n = self.max_chunk or len(tokens)
        for i in range(0, len(tokens), n):
            out = self.method.execute([torch.tensor([tokens[i:i + n]], dtype=torch.int64),
                                       torch.tensor([start_pos + i], dtype=torch.int64)])[0]
        return out.reshape(-1, out.shape[-1])[-1].clone()


# artifact format -> "module:factory" under slmc.runtime_tests; factory(folder, manifest) -> Session
SESSIONS = {
    "pte": "sessions:ExecuTorchSession.from_artifact",
    "pte-moe": "moe_runner:open_moe",  # expert offload: segments + LRU/predictive expert cache
    "tflite": "tflite_session:open_tflite",
    "mlpackage": "coreml_session:open_coreml",
}


def open_session(folder: Path, manifest: dict) -> Session:
    import importlib

    fmt = manifest.get("format")
    if fmt not in SESSIONS:
        raise SlmcError(f"no runtime session for artifact format {fmt!r}", str(folder))
    mod, _, attr = SESSIONS[fmt].partition(":")
    obj = importlib.import_module(f"{__package__}.{mod}")
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj(Path(folder), manifest)
