"""Read quantized tensors back out of an artifact and compare them with slmc's codes.

The claim "the artifact holds slmc's codes and scales unchanged" is checked on the
artifact's bytes, not on anything slmc kept on the side. For each QuantWeight of the
reference IR, each target's `readback` (targets/<name>/readback.py) rebuilds the exact byte image the runtime's storage format
gives those codes (nibble order, code offset, scale dtype) and looks for it among the
tensors stored in the artifact. The result lists every tensor that was not found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..compiler.ir import QuantWeight


@dataclass
class Readback:
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # "path: what was not found"

    @property
    def exact(self) -> bool:
        return self.checked > 0 and not self.missing


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def signed_codes(w: QuantWeight) -> torch.Tensor:
    """Codes in the signed range every runtime stores (asymmetric ones shifted by 2^(b-1))."""
    if w.symmetric:
        return w.codes.to(torch.int16)
    return w.codes.to(torch.int16) - 2 ** (w.bits - 1)


def pack_nibbles(codes: torch.Tensor, low_first: bool) -> bytes:
    """Two signed int4 codes per byte, stored as code + 8."""
    c = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(codes.shape[0], -1, 2)
    lo, hi = (c[..., 0], c[..., 1]) if low_first else (c[..., 1], c[..., 0])
    return tensor_bytes(hi << 4 | lo)
