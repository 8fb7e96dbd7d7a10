"""ONNX readback: slmc's codes, scales and zero points as MatMulNBits / GatherBlockQuantized
constants in `model.onnx` (and its external data), compared byte for byte with the images
codes.py defines from the reference IR."""

from __future__ import annotations

from pathlib import Path

from ...compiler.ir import Model
from ..readback import Readback
from .codes import MS_DOMAIN, _weights, images
from .split8 import SIXTEEN, joined


def _stored(artifact: Path) -> dict[str, set[tuple]]:
    """op -> {(codes bytes, scales bytes, zero-point bytes or b"", bits, block_size)} of every
    quantized node in the file; an 8-bit weight stored as two 4-bit planes (split8.py) counts
    as the 8-bit image they hold, and a gather's codes are followed through a Reshape."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(artifact), load_external_data=True).graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def raw(name):
        if name in inits:
            return numpy_helper.to_array(inits[name]).tobytes()
        n = producer.get(name)
        return raw(n.input[0]) if n is not None and n.op_type == "Reshape" else None

    out: dict[str, set[tuple]] = {"MatMulNBits": set(), "GatherBlockQuantized": set()}
    for n in g.node:
        if n.domain == MS_DOMAIN and n.op_type in out:
            attrs = {a.name: a.i for a in n.attribute}
            data, scales, zeros = _ins(n)
            out[n.op_type].add((raw(data), raw(scales), raw(zeros) if zeros else b"", attrs.get("bits", 4),
                                attrs.get("block_size")))
        elif n.op_type == "Add" and (split := _split(n, producer, raw, inits)) is not None:
            out[split[0]].add(split[1])
    return out


def _ins(n) -> tuple[str, str, str | None]:
    """(codes, scales, zero points or None) of a MatMulNBits or GatherBlockQuantized."""
    data = n.input[1] if n.op_type == "MatMulNBits" else n.input[0]
    return data, n.input[2], (n.input[3] if len(n.input) > 3 and n.input[3] else None)


def _split(add, producer, raw, inits) -> tuple[str, tuple] | None:
    """(op, the 8-bit image) when `add` joins split8's planes: Add(Mul(hi, 16), lo), hi and lo
    4-bit ops of one kind on the same input and the same scales; else None."""
    from onnx import numpy_helper

    mul, lo = (producer.get(i) for i in add.input)
    if mul is None or lo is None or mul.op_type != "Mul" or mul.input[1] != SIXTEEN:
        return None
    hi = producer.get(mul.input[0])
    if SIXTEEN not in inits or float(numpy_helper.to_array(inits[SIXTEEN])) != 16.0 or hi is None:
        return None
    if not (hi.domain == lo.domain == MS_DOMAIN and hi.op_type == lo.op_type):
        return None
    a_hi, a_lo = ({a.name: a.i for a in x.attribute} for x in (hi, lo))
    at = 0 if hi.op_type == "MatMulNBits" else 1  # the activations, or the ids
    (dh, sh, zh), (dl, sl, zl) = _ins(hi), _ins(lo)
    if (a_hi.get("bits"), a_lo.get("bits")) != (4, 4) or a_hi.get("block_size") != a_lo.get("block_size") or \
            sh != sl or hi.input[at] != lo.input[at] or zl is None or sh not in inits:
        return None
    rows, blocks = tuple(inits[sh].dims)
    bh, bl, bzl, bzh = raw(dh), raw(dl), raw(zl), raw(zh) if zh else None
    if bh is None or bl is None or bzl is None or (zh and bzh is None):
        return None
    codes, zeros = joined(bh, bl, bzh, bzl, rows, blocks)
    return hi.op_type, (codes, raw(sh), zeros, 8, a_hi["block_size"])


def readback(model: Model, artifact: Path) -> Readback:
    """Every QuantWeight's codes must be a MatMulNBits B (a linear, the head) or a
    GatherBlockQuantized table (the embedding; a tied table must be both), with its scales and
    zero points (none when symmetric), at its bit width and block size."""
    stored = _stored(Path(artifact))
    rb = Readback()
    for path, w, is_table in _weights(model):
        rb.checked += 1
        im = images(w)
        key = (im.codes.tobytes(), im.scales.tobytes(), b"" if im.zeros is None else im.zeros.tobytes(), w.bits,
               im.block)
        op = "GatherBlockQuantized" if is_table else "MatMulNBits"
        if key not in stored[op]:
            rb.missing.append(f"{path}: codes/scales/zero points not stored unchanged in a {op}")
    return rb
