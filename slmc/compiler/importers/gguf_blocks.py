"""GGUF Q4_0 / Q4_1 / Q8_0 blocks as slmc QuantWeights: the file's own codes and scales.

ggml's block layouts (32 weights of one row per block, little-endian):
  Q4_0  18 bytes: d:f16, qs[16]         w = d * (q - 8)      q in 0..15
  Q4_1  20 bytes: d:f16, m:f16, qs[16]  w = d * q + m        q in 0..15
  Q8_0  34 bytes: d:f16, qs[32]:i8      w = d * q            q in -128..127
In the 4-bit blocks byte j holds weight j in its low nibble and weight j + 16 in its high one.

Mapping onto QuantWeight's (code - zero) * scale, group size 32:
  Q4_0  symmetric int4: code = q - 8, scale = d                      (exact)
  Q4_1  asymmetric int4: code = q, scale = d, zero = -m / d          (fractional zero)
  Q8_0  symmetric int8: code = q, scale = d                          (exact)
Q4_1's zero is a float, so (q - zero) * d equals d * q + m up to one float32 rounding;
a block with d = 0 (every weight = m) gets codes 0 and a scale of |m| (or 1).
The scales are fp16 values, so fp16-scale runtimes (Core ML) hold them exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ir import QuantWeight

BLOCK = 32
# type name -> (bytes per block, bits, symmetric)
LAYOUTS = {"Q4_0": (18, 4, True), "Q4_1": (20, 4, False), "Q8_0": (34, 8, True)}


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] packed bytes -> [..., 32] codes 0..15 in weight order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def block_codes(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantWeight:
    """QuantWeight [rows, cols] from the raw block bytes of one GGUF tensor ([rows, bytes/row])."""
    size, bits, sym = LAYOUTS[type_name]
    rows, cols = shape
    if cols % BLOCK:
        raise ValueError(f"row length {cols} is not a multiple of the {BLOCK}-weight block")
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // BLOCK, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    zeros = None
    if type_name == "Q8_0":
        codes = b[..., 2:].view(np.int8).reshape(rows, cols)
    elif type_name == "Q4_0":
        codes = (_nibbles(b[..., 2:]).astype(np.int16) - 8).astype(np.int8).reshape(rows, cols)
    else:  # Q4_1
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        q = _nibbles(b[..., 4:]).astype(np.uint8)
        flat = d == 0
        if flat.any():  # w = m everywhere in the block: code 0, zero = -m / scale
            q[flat] = 0
            d = np.where(flat, np.where(m != 0, np.abs(m), np.float32(1)), d)
        zeros = torch.from_numpy((-m / d).astype(np.float32))
        codes = q.reshape(rows, cols)
    return QuantWeight(codes=torch.from_numpy(np.array(codes, copy=True)), scales=torch.from_numpy(d.copy()),
                       zeros=zeros, group_size=BLOCK, bits=bits, symmetric=sym,
                       algorithm=f"gguf:{type_name.lower()}")


def permute_rows(w: QuantWeight, perm) -> QuantWeight:
    """The same QuantWeight with its output rows reordered (rows carry their own groups)."""
    w.codes, w.scales = perm(w.codes.numpy()), perm(w.scales.numpy())
    w.codes, w.scales = torch.from_numpy(np.array(w.codes)), torch.from_numpy(np.array(w.scales))
    if w.zeros is not None:
        w.zeros = torch.from_numpy(np.array(perm(w.zeros.numpy())))
    return w
