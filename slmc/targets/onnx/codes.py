"""slmc's codes in the ONNX graph: MatMulNBits for quantized linears, GatherBlockQuantized
for a quantized embedding (both com.microsoft; semantics in rules.py).

The decoder is exported with each QuantWeight as its exact dequantized float (one exporter
path for float and quantized IRs); `quantize_graph` then finds, by their bytes, the MatMul
whose constant B is that float weight transposed (or a Transpose of the table, for a tied
head) and the Gather reading the table, and replaces each by the quantized op holding the
codes. `images` is the one definition of the stored bytes, used by the writer and by
readback.py. A QuantWeight that is not found fails the compile: nothing is left in float silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ...compiler.ir import Model, QuantWeight, named_weights
from ...errors import SlmcError
from .rules import block_size

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Images:
    """What the artifact stores for one QuantWeight [N, K]: codes packed low nibble first
    ([N, K/b, b*bits/8], the same bytes as GatherBlockQuantized's [N, K*bits/8]), fp32
    scales [N, K/b], and zero points (None: symmetric, the op's default 2^(bits-1))."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    block: int


def _pack4(u: np.ndarray) -> np.ndarray:
    """Rows of unsigned 4-bit values, two per byte, even index in the low nibble."""
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), u.dtype)], axis=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def images(w: QuantWeight) -> Images:
    n, k = w.shape
    b = block_size(w.group_size)
    rep = w.group_size // b
    codes = w.codes.numpy().astype(np.int16)
    u = (codes + 2 ** (w.bits - 1) if w.symmetric else codes).astype(np.uint8)
    packed = (_pack4(u) if w.bits == 4 else u).reshape(n, k // b, b * w.bits // 8)
    scales = np.repeat(w.scales.float().numpy().astype(np.float32), rep, axis=1)
    zeros = None
    if w.zeros is not None:
        z = np.repeat(w.zeros.float().numpy().astype(np.uint8), rep, axis=1)
        zeros = _pack4(z) if w.bits == 4 else z
    return Images(np.ascontiguousarray(packed), np.ascontiguousarray(scales), zeros, b)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def external_info(t) -> dict[str, str]:
    """An initializer's external_data entries (location, offset, length); empty when inline."""
    return {e.key: e.value for e in t.external_data}


def read_external(base_dir: str, ext: dict[str, str]) -> bytes:
    """The bytes an external_data entry points at, in base_dir."""
    import os

    with open(os.path.join(base_dir, ext["location"]), "rb") as f:
        return os.pread(f.fileno(), int(ext["length"]), int(ext.get("offset", 0)))


def _initializer_digests(graph, base_dir: str) -> dict[str, str]:
    """sha1 of each 2-D float initializer's values -> its name; one read at a time (an
    external one from its file in base_dir, leaving the proto as it is)."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import uses_external_data

    out = {}
    for t in graph.initializer:
        if t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            continue
        if uses_external_data(t):
            raw = read_external(base_dir, external_info(t))
            a = np.frombuffer(raw, dtype=np.float32).reshape(tuple(t.dims))
        else:
            a = numpy_helper.to_array(t)
        out.setdefault(_digest(a), t.name)
    return out


def _add(graph, name: str, a: np.ndarray) -> str:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(a, name))
    return name


def _weights(model: Model) -> list[tuple[str, QuantWeight, bool]]:
    """(path, weight, is the embedding table) of every QuantWeight; a tied table is both."""
    out = [(p, w, False) for p, w in named_weights(model) if isinstance(w, QuantWeight) and w is not model.embed]
    if isinstance(model.embed, QuantWeight):
        out.append(("embed", model.embed, True))
        if model.lm_head is None or model.lm_head.weight is model.embed:
            out.append(("lm_head(tied)", model.embed, False))
    return out


def quantize_graph(proto, model: Model, base_dir: str = "") -> int:
    """Replace the float MatMul/Gather of every QuantWeight by MatMulNBits/GatherBlockQuantized
    in place; returns how many nodes were replaced. base_dir: where external initializers'
    files are."""
    from onnx import helper

    g = proto.graph
    digests = _initializer_digests(g, base_dir) if _weights(model) else {}
    producer = {o: n for n in g.node for o in n.output}
    replaced, stored = 0, {}
    for path, w, is_table in _weights(model):
        f = w.float().numpy().astype(np.float32)
        name = digests.get(_digest(f if is_table else f.T))  # MatMul's B is the weight transposed
        table = digests.get(_digest(f))  # a tied head may read the table through a Transpose
        if path not in stored:
            im = images(w)
            key = path.replace("(tied)", "")
            stored[path] = (im, _add(g, f"{key}.qcodes", im.codes if not is_table else im.codes.reshape(w.shape[0], -1)),
                            _add(g, f"{key}.qscales", im.scales),
                            None if im.zeros is None else _add(g, f"{key}.qzeros", im.zeros if is_table else im.zeros.reshape(-1)))
        im, codes, scales, zeros = stored[path]
        hits = 0
        for i, node in enumerate(list(g.node)):
            if is_table and node.op_type == "Gather" and name is not None and node.input[0] == name:
                ins = [codes, node.input[1], scales] + ([zeros] if zeros else [])
                new = helper.make_node("GatherBlockQuantized", ins, list(node.output), name=node.name,
                                       domain=MS_DOMAIN, bits=w.bits, block_size=im.block, gather_axis=0,
                                       quantize_axis=1)
            elif not is_table and node.op_type == "MatMul" and _reads(node.input[1], name, table, producer):
                ins = [node.input[0], codes, scales] + ([zeros] if zeros else [])
                # accuracy_level=1: fp32 compute on the exactly dequantized weight (4 would
                # quantize the activations, see rules.py)
                new = helper.make_node("MatMulNBits", ins, list(node.output), name=node.name, domain=MS_DOMAIN,
                                       K=w.shape[1], N=w.shape[0], bits=w.bits, block_size=im.block,
                                       accuracy_level=1)
            else:
                continue
            g.node[i].CopyFrom(new)
            hits += 1
        if not hits:
            raise SlmcError(f"{path}: its float image was not found as a MatMul/Gather constant in the exported "
                            "graph, so its codes cannot be stored (an exporter change?)", "onnx")
        replaced += hits
    _prune(g)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return replaced


def _reads(inp: str, name: str | None, table: str | None, producer: dict) -> bool:
    if name is not None and inp == name:
        return True
    t = producer.get(inp)
    return (table is not None and t is not None and t.op_type == "Transpose" and t.input[0] == table
            and [list(a.ints) for a in t.attribute if a.name == "perm"] in ([], [[1, 0]]))


def _prune(g) -> None:
    """Drop nodes whose outputs nothing reads and initializers nothing reads."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | outputs
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
