"""8-bit codes as two 4-bit planes, so that ONNX Runtime's fast fp32 kernels read them.

ONNX Runtime (1.31 and 1.32) has a prepacked fp32-compute MatMulNBits kernel for 4-bit B only:
an 8-bit B at accuracy_level 0-2 is dequantized whole on every call. For the int8 head of
SmolLM2-135M (49152 x 576) that is 130 ms per decode token against 1.4 ms for the same shape in
4 bits (bench/results/compile_targets.md); the fast 8-bit kernel (accuracy_level 4) quantizes
the activations, which rules.py refuses. So an 8-bit weight is stored as its two nibble planes,
each a 4-bit op on the same scales:

    u = 16*hi + lo and z = 16*zh + zl  =>  (u - z)*s = 16*((hi - zh)*s) + (lo - zl)*s

    before: y = MatMulNBits[bits=8](a, u, s[, z])
    after:  y = Add(Mul(MatMulNBits[bits=4](a, hi, s[, zh]), 16), MatMulNBits[bits=4](a, lo, s, zl))

A symmetric 8-bit code has the op's implicit zero point 128 = 16*8 + 0: hi keeps the 4-bit
default (8) and lo gets explicit zeros. The planes hold the same bytes' worth of codes, so the
artifact keeps its size, and readback.py rebuilds u and z from them exactly. The dequantized
weight differs from the 8-bit op's by the rounding of two products and a sum instead of one
product (under 2^-14 * s, tests/test_onnx_split8.py), which the fp32 bound covers as it covers
summation order.
A gathered table uses the same planes (two 4-bit GatherBlockQuantized), so a tied table is stored once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIXTEEN = "slmc.sixteen"  # the scalar 16.0 each split multiplies its high plane by


@dataclass(frozen=True)
class Planes:
    """An 8-bit image's nibble planes, packed as 4-bit codes [N, K/b, b/2]; zero points packed
    per row [N, ceil(K/b / 2)] (hi None: the 4-bit default 8, i.e. a symmetric 8-bit code)."""

    hi: np.ndarray
    lo: np.ndarray
    zh: np.ndarray | None
    zl: np.ndarray


def pack4(u: np.ndarray) -> np.ndarray:
    """Rows of unsigned 4-bit values, two per byte, even index in the low nibble."""
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), u.dtype)], axis=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack4(p: np.ndarray, n: int) -> np.ndarray:
    """pack4's inverse for rows of n values."""
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), np.uint8)
    out[..., 0::2], out[..., 1::2] = p & 15, p >> 4
    return out[..., :n]


def planes(codes: np.ndarray, zeros: np.ndarray | None) -> Planes:
    """codes: unsigned 8-bit [N, K/b, b]; zeros: unsigned [N, K/b] or None (symmetric)."""
    # a block of rows at a time: a 49152-row table's shifted, masked and strided transients
    # were 100 MiB at once
    hi = np.empty(codes.shape[:-1] + ((codes.shape[-1] + 1) // 2,), np.uint8)
    lo = np.empty_like(hi)
    step = max(1, (1 << 22) // max(1, codes[0].size))
    for r in range(0, len(codes), step):
        c = codes[r:r + step]
        hi[r:r + step], lo[r:r + step] = pack4(c >> 4), pack4(c & 15)
    if zeros is None:
        return Planes(hi, lo, None, pack4(np.zeros(codes.shape[:2], np.uint8)))
    return Planes(hi, lo, pack4(zeros >> 4), pack4(zeros & 15))


def joined(hi: bytes, lo: bytes, zh: bytes | None, zl: bytes, rows: int, blocks: int) -> tuple[bytes, bytes]:
    """(codes, zero points) of the 8-bit image that `planes` split; zero points b"" when
    symmetric (hi without zero points and lo's all 0), as Images writes them."""
    h, lo_ = (unpack4(np.frombuffer(b, np.uint8).reshape(rows, -1), 2 * len(b) // rows) for b in (hi, lo))
    codes = ((h << 4) | lo_).astype(np.uint8).tobytes()
    zl_ = unpack4(np.frombuffer(zl, np.uint8).reshape(rows, -1), blocks)
    if zh is None:
        return codes, (b"" if not zl_.any() else b"\xff-not-symmetric")  # matches no image
    zh_ = unpack4(np.frombuffer(zh, np.uint8).reshape(rows, -1), blocks)
    return codes, ((zh_ << 4) | zl_).astype(np.uint8).tobytes()


def matmul_nodes(name: str, a: str, out: str, p: dict[str, str], k: int, n: int, block: int) -> list:
    """The split of one 8-bit MatMulNBits; p names the initializers hi, lo, s, zh (or None), zl."""
    from onnx import helper

    def mm(part, zp):
        return helper.make_node("MatMulNBits", [a, p[part], p["s"]] + ([zp] if zp else []), [f"{name}.{part}"],
                                name=f"{name}.{part}", domain="com.microsoft", K=k, N=n, bits=4,
                                block_size=block, accuracy_level=1)

    return [mm("hi", p["zh"]), mm("lo", p["zl"]), *_join(name, out)]


def gather_nodes(name: str, idx: str, out: str, p: dict[str, str], block: int) -> list:
    """The split of one 8-bit GatherBlockQuantized; p's codes and zero points in gather shape."""
    from onnx import helper

    def gq(part, zp):
        return helper.make_node("GatherBlockQuantized", [p[part], idx, p["s"]] + ([zp] if zp else []),
                                [f"{name}.{part}"], name=f"{name}.{part}", domain="com.microsoft", bits=4,
                                block_size=block, gather_axis=0, quantize_axis=1)

    return [gq("hi", p["zh"]), gq("lo", p["zl"]), *_join(name, out)]


def _join(name: str, out: str) -> list:
    from onnx import helper

    return [helper.make_node("Mul", [f"{name}.hi", SIXTEEN], [f"{name}.hi16"], name=f"{name}.hi16"),
            helper.make_node("Add", [f"{name}.hi16", f"{name}.lo"], [out], name=name)]


def constant(graph, name: str, value: np.ndarray) -> str:
    """An initializer several nodes share, added on first use; returns its name."""
    from onnx import numpy_helper

    if not any(t.name == name for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def sixteen(graph) -> None:
    """The shared scalar 16.0."""
    constant(graph, SIXTEEN, np.array(16.0, np.float32))
