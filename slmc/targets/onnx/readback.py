"""ONNX readback: slmc's codes, scales and zero points as MatMulNBits / GatherBlockQuantized
constants in `model.onnx` (and its external data), compared byte for byte with the images
codes.py defines from the reference IR."""

from __future__ import annotations

from pathlib import Path

from ...compiler.ir import Model
from ..readback import Readback
from .codes import MS_DOMAIN, _weights, images


def _stored(artifact: Path) -> dict[str, set[tuple]]:
    """op -> {(codes bytes, scales bytes, zero-point bytes or b"", bits, block_size)} of every
    quantized node in the file."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(artifact), load_external_data=True)
    inits = {t.name: t for t in proto.graph.initializer}

    def raw(name):
        return numpy_helper.to_array(inits[name]).tobytes() if name in inits else None

    out: dict[str, set[tuple]] = {"MatMulNBits": set(), "GatherBlockQuantized": set()}
    for n in proto.graph.node:
        if n.domain != MS_DOMAIN or n.op_type not in out:
            continue
        attrs = {a.name: a.i for a in n.attribute}
        data, scales = (n.input[1], n.input[2]) if n.op_type == "MatMulNBits" else (n.input[0], n.input[2])
        zeros = n.input[3] if len(n.input) > 3 and n.input[3] else None
        out[n.op_type].add((raw(data), raw(scales), raw(zeros) if zeros else b"", attrs.get("bits", 4),
                            attrs.get("block_size")))
    return out


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
