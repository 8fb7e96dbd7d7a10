"""The .pte in ExecuTorch's runtime (pybindings), one step at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import SlmcError, UnsupportedError


def require_host_runnable(folder: Path, manifest: dict, what: str) -> None:
    """Refuse, with the reason, an artifact whose backend has no delegate in this runtime."""
    if not manifest.get("host_runnable", True):
        raise UnsupportedError(
            f"{what} for the {manifest.get('backend')} backend cannot run on this host "
            f"({manifest.get('backend_note', 'no delegate in this runtime')}); validate it on a device "
            "with ExecuTorch's runtime", str(folder))


class ExecuTorchSession:
    """The .pte in ExecuTorch's runtime (pybindings), on this host's CPU."""

    runtime = "executorch"

    def __init__(self, pte: Path, max_chunk: int | None = None, data: Path | None = None):
        import executorch.kernels.quantized  # noqa: F401  registers quantized kernels
        from executorch.runtime import Runtime

        self.pte, self.max_chunk = Path(pte), max_chunk
        if data is None and self.pte.with_name("model.ptd").is_file():  # a tied table kept beside it
            data = self.pte.with_name("model.ptd")
        try:
            self.program = Runtime.get().load_program(str(self.pte), data_path=str(data) if data else None)
        except Exception as e:  # the runtime raises bare RuntimeErrors
            raise SlmcError(f"ExecuTorch could not load the program: {e}", str(self.pte)) from None
        self.reset()

    @classmethod
    def from_artifact(cls, folder: Path, manifest: dict) -> "ExecuTorchSession":
        require_host_runnable(folder, manifest, "a .pte")
        # a ring-buffer cache takes at most its non-sink slots per call, as the runner's prefill
        ring = manifest.get("kv_cache", {}).get("ring")
        data = manifest.get("data_file")  # the tied table kept beside the .pte (program.tied_table)
        return cls(Path(folder) / manifest["artifact"], ring["max_tokens_per_call"] if ring else None,
                   Path(folder) / data if data else None)

    def reset(self) -> None:
        # A fresh method gets fresh (zero-filled) planned memory, so an empty cache.
        self.method = self.program.load_method("forward")

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        n = self.max_chunk or len(tokens)
        for i in range(0, len(tokens), n):
            out = self.method.execute([torch.tensor([tokens[i:i + n]], dtype=torch.int64),
                                       torch.tensor([start_pos + i], dtype=torch.int64)])[0]
        return out.reshape(-1, out.shape[-1])[-1].clone()

    def step_all(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Logits of every position: the runner's program returns its last row only, so one
        token per call (the prefill path's cache writes are still read by every later row)."""
        return torch.stack([self.step([t], start_pos + i) for i, t in enumerate(tokens)])
