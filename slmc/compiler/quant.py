"""Groupwise integer quantization primitives shared by the quantization passes.

Convention (the same as QuantWeight's): for a group of `g` input columns of one
output row, dequant = (code - zero) * scale, with
- symmetric: zero = 0, codes in [-2^(b-1), 2^(b-1) - 1], scale = max|w| / (2^(b-1) - 1)
  (the extra negative code stays available to rounding, as XNNPACK/torchao do);
- asymmetric: codes in [0, 2^b - 1], scale = (max - min) / (2^b - 1), zero = round(-min / scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SlmcError
from .ir import QuantWeight, Weight, row_chunks
from .spill import file_ranges, let_go


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    # "bfloat16"/"float16": scales rounded to that dtype before the codes are chosen, so a
    # runtime that stores them so (XNNPACK blockwise: bf16; Core ML fp16) holds them exactly
    scale_dtype: str = "float32"

    def at(self, in_features: int) -> "QuantScheme":
        """group_size 0 means one group per row (per channel, what XNNPACK's int8 GEMM takes)."""
        if self.group_size:
            return self
        return QuantScheme(self.bits, in_features, self.symmetric, self.scale_dtype)

    def check(self, in_features: int, where: str) -> None:
        if self.group_size == 0:
            return self.at(in_features).check(in_features, where)
        if self.scale_dtype not in ("float32", "bfloat16", "float16"):
            raise SlmcError(f"scale_dtype {self.scale_dtype!r}: float32, bfloat16 or float16", where)
        if self.bits not in (4, 8):
            raise SlmcError(f"bit width {self.bits} is not supported (4 or 8)", where)
        if self.group_size <= 0 or in_features % self.group_size:
            raise SlmcError(f"group size {self.group_size} does not divide the input dimension "
                            f"{in_features}", where)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """int8 storage for symmetric codes, uint8 for asymmetric ones (8-bit asym reaches 255)."""
        return torch.int8 if self.symmetric else torch.uint8


def _round_scale(scale: torch.Tensor, s: QuantScheme) -> torch.Tensor:
    if s.scale_dtype in ("bfloat16", "float16"):
        dt = getattr(torch, s.scale_dtype)
        tiny = torch.tensor(6.2e-5 if dt == torch.float16 else 1e-12, dtype=dt).float()  # a normal value of dt
        return torch.maximum(scale.to(dt).float(), tiny)
    return scale


def group_params(w: torch.Tensor, s: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zeros) per [out, in // g] group from the weight's range."""
    s = s.at(w.shape[1])
    g = w.float().reshape(w.shape[0], -1, s.group_size)
    if s.symmetric:
        scale = g.abs().amax(-1) / s.qmax
        return _round_scale(scale.clamp_min(1e-12), s), None
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = _round_scale(((hi - lo) / s.qmax).clamp_min(1e-12), s)
    zero = torch.round(-lo / scale).clamp(s.qmin, s.qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, s: QuantScheme) -> torch.Tensor:
    """Round w to integer codes with the given per-group scale/zero."""
    s = s.at(w.shape[1])
    sc = scale.repeat_interleave(s.group_size, dim=1)
    z = zero.repeat_interleave(s.group_size, dim=1) if zero is not None else 0.0
    return torch.clamp(torch.round(w.float() / sc + z), s.qmin, s.qmax).to(s.code_dtype)


RTN_CHUNK = 1 << 22  # elements per row chunk of a big table


def rtn(w: torch.Tensor | Weight, s: QuantScheme, algorithm: str = "rtn",
        scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> QuantWeight:
    """Round-to-nearest with the range-derived (or given) scales. A big table (a 128k-row
    embedding) goes in row chunks, rows being independent: its fp32 temporaries stay small,
    and a Weight not in memory is read a chunk at a time (Weight.rows)."""
    s = s.at(w.shape[1])
    step = max(1, RTN_CHUNK // w.shape[1])
    if scale is None and w.shape[0] > step:
        # each chunk's tables go straight into the whole ones: a list of parts and their cat
        # held a 128k-row table's codes twice (+250 MiB at Llama-3.2-1B)
        out = None
        parts = w.row_chunks(step * w.shape[1]) if isinstance(w, Weight) else row_chunks(w, step * w.shape[1])
        for r, part in zip(range(0, w.shape[0], step), parts):
            p = rtn(part, s, algorithm)
            # a mapped table's pages are read once: let go as we go (a 128k-row bf16 table is
            # 0.5 GB, resident whole by the end otherwise); a heap table is left alone
            let_go(file_ranges([part]))
            if out is None:
                out = QuantWeight(codes=torch.empty(w.shape, dtype=p.codes.dtype),
                                  scales=torch.empty(w.shape[0], p.scales.shape[1], dtype=p.scales.dtype),
                                  zeros=None if p.zeros is None else torch.empty(w.shape[0], p.zeros.shape[1],
                                                                                 dtype=p.zeros.dtype),
                                  group_size=s.group_size, bits=s.bits, symmetric=s.symmetric, algorithm=algorithm)
            for t, got in ((out.codes, p.codes), (out.scales, p.scales), (out.zeros, p.zeros)):
                if t is not None:
                    t[r:r + step] = got
        return out
    if isinstance(w, Weight):
        w = w.data
    if scale is None:
        scale, zero = group_params(w, s)
    codes = quantize_codes(w, scale, zero, s)
    return QuantWeight(codes=codes, scales=scale.float(), zeros=zero.float() if zero is not None else None,
                       group_size=s.group_size, bits=s.bits, symmetric=s.symmetric, algorithm=algorithm)


def fake_quant_tokens(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 activation quantization, asymmetric per token, then back to float.

    The formula of torchao's choose_qparams_affine(ASYMMETRIC) + quantize/dequantize_affine,
    which is what XNNPACK's qd8 kernels implement, so the reference and the artifact
    round the same activations the same way.
    """
    xf = x.float()
    lo = xf.amin(-1, keepdim=True).clamp(max=0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).eps)
    zero = torch.clamp(-128 - torch.round(lo / scale), -128, 127)
    q = torch.clamp(torch.round(xf * (1.0 / scale)) + zero, -128, 127)
    return ((q - zero) * scale).to(x.dtype)
