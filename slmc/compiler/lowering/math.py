"""The lowering's own numerics: activations, RoPE tables, the int8 KV code, ring visibility, soft-cap.

Written here, not imported from the reference executor, so that validation compares two
independent readings of the IR: a wrong formula in one shows up as a mismatch instead of
being reproduced on both sides. tests/test_lowering_math.py checks that both agree.
Every function keeps the op order the exported graphs were built with (artifact bytes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ir import RoPE

SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi), GELU's tanh approximation


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma's soft-capping: a smooth clamp of x into (-cap, cap)."""
    return torch.tanh(x / cap) * cap


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The MLP activation as torch's own ops (ExecuTorch and LiteRT map them natively)."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.gelu(x)


def activation_spelled(name: str, x: torch.Tensor) -> torch.Tensor:
    """The same activation with GELU's tanh form written out: coremltools 9 drops torch.export's
    gelu(approximate="tanh") keyword and converts it as exact gelu; spelled out, its own pass
    fuses it back correctly."""
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    return activation(name, x)


def rope_frequencies(rope: RoPE) -> torch.Tensor:
    """Inverse frequencies [rope.dim // 2] (float64 until the end) for the scalings the IR
    carries: none, "linear" (positions divided by factor) and "llama3" (Llama 3.1's
    wavelength-banded rescaling: long wavelengths / factor, short ones kept, a smooth blend)."""
    exponents = torch.arange(0, rope.dim, 2, dtype=torch.float64) / rope.dim
    freq = 1.0 / (rope.theta ** exponents)
    cfg = rope.scaling or {}
    kind = cfg.get("rope_type", "default")
    if kind == "linear":
        freq = freq / cfg["factor"]
    elif kind == "llama3":
        factor = cfg["factor"]
        low, high = cfg["low_freq_factor"], cfg["high_freq_factor"]
        context = cfg["original_max_position_embeddings"]
        wavelength = 2 * math.pi / freq
        long_band = wavelength > context / low  # wavelengths past the trained context: interpolate
        short_band = wavelength < context / high  # well inside it: unchanged
        banded = torch.where(long_band, freq / factor, freq)
        blend = (context / wavelength - low) / (high - low)
        blended = (1 - blend) * freq / factor + blend * freq
        freq = torch.where(~long_band & ~short_band, blended, banded)
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} is not lowered")
    return freq.float()


def rope_tables(rope: RoPE, length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] for positions 0..length-1, rotate-half convention;
    past rope.dim (partial rotary) cos = 1 and sin = 0, so the tail passes unchanged."""
    angles = torch.outer(torch.arange(length).float(), rope_frequencies(rope))
    angles = angles.repeat(1, 2)
    tail = head_dim - rope.dim
    return F.pad(angles.cos(), (0, tail), value=1.0), F.pad(angles.sin(), (0, tail), value=0.0)


def rotate_half_matrix(head_dim: int, rot_dim: int, dtype) -> torch.Tensor:
    """R with x @ R == rotate_half(x) on the first rot_dim dims (zero elsewhere).

    RoPE as x * cos + (x @ R) * sin has no slices or concats of dynamic-length
    tensors, so XNNPACK takes it whole instead of splitting the graph around it.
    """
    R = torch.zeros(head_dim, head_dim, dtype=dtype)
    half = rot_dim // 2
    idx = torch.arange(half)
    R[idx + half, idx] = -1.0
    R[idx, idx + half] = 1.0
    return R


def int8_kv_scale(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scale per token and KV head: max |x| over head_dim maps to 127."""
    return (x.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-10)


def int8_kv_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The codes in [-127, 127] (float; the caller casts to int8 where it stores them)."""
    return torch.round(x / scale).clamp(-127, 127)


def ring_visible(q: torch.Tensor, k: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """A ring cache of `window` slots, `sinks` of them pinned: the query at position q still
    finds key position k when k is a sink or one of the last window - sinks positions."""
    return (k < sinks) | (q - k < window - sinks)
