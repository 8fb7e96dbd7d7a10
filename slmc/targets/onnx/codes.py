"""slmc's codes in the ONNX graph: MatMulNBits for quantized linears, GatherBlockQuantized
for a quantized embedding (both com.microsoft; semantics in rules.py).

The decoder is exported with each QuantWeight as its exact dequantized float (one exporter
path for float and quantized IRs); `quantize_graph` then finds, by their bytes, the MatMul
whose constant B is that float weight transposed (or a Transpose of the table, for a tied
head) and the Gather reading the table, and replaces each by the quantized op holding the
codes: an 8-bit weight that a MatMul reads as its two 4-bit planes (split8.py), and a tied
table once, in MatMulNBits' shape, which its gather reads through a Reshape. `images` is the
one definition of the stored bytes, used by the writer and by readback.py. A QuantWeight that
is not found fails the compile: nothing is left in float silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ...compiler.ir import DEQUANT_CHUNK, Model, QuantWeight, named_weights
from ...compiler.spill import trim_heap
from ...errors import SlmcError
from .rules import block_size
from .split8 import constant, gather_nodes, matmul_nodes, pack4, planes, sixteen

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


def images(w: QuantWeight) -> Images:
    n, k = w.shape
    b = block_size(w.group_size)
    rep = w.group_size // b
    # a block of rows at a time: the int16 and uint8 transients of a 49152-row table were 85 MiB
    packed = np.empty((n, k // b, b * w.bits // 8), np.uint8)
    step = max(1, DEQUANT_CHUNK // k)
    for r in range(0, n, step):
        codes = w.codes[r:r + step].numpy().astype(np.int16)
        u = (codes + 2 ** (w.bits - 1) if w.symmetric else codes).astype(np.uint8)
        packed[r:r + step] = (pack4(u) if w.bits == 4 else u).reshape(len(u), k // b, -1)
    trim_heap()  # the blocks' transients, which glibc would keep
    scales = np.repeat(w.scales.float().numpy().astype(np.float32), rep, axis=1)
    zeros = None
    if w.zeros is not None:
        z = np.repeat(w.zeros.float().numpy().astype(np.uint8), rep, axis=1)
        zeros = pack4(z) if w.bits == 4 else z
    return Images(packed, np.ascontiguousarray(scales), zeros, b)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def image_digests(w: QuantWeight) -> tuple[str, str]:
    """sha1 of w's exact dequantized float32 image [N, K] in C order, and of its transpose
    [K, N] (a MatMul's B), made a block of rows (columns) at a time: the image is never whole
    in memory (its fp32, a transposed copy and their bytes were 4 copies of a 113 MiB tied
    table at once). The values are QuantWeight.rows', which float() is made of."""
    n, k = w.shape
    g, chunk = w.group_size, DEQUANT_CHUNK // 4  # hashing is no slower in small blocks
    rows, cols = hashlib.sha1(), hashlib.sha1()
    step = max(1, chunk // k)
    for r in range(0, n, step):
        rows.update(w.rows(slice(r, r + step)).numpy().astype(np.float32, copy=False).tobytes())
    step = max(g, chunk // n // g * g)  # whole groups, so each block's scales are its own
    for c in range(0, k, step):
        cols.update(np.ascontiguousarray(w.rows(slice(None), slice(c, c + step)).numpy().T, np.float32).tobytes())
    trim_heap()  # the blocks' temporaries: freed, but kept by glibc
    return rows.hexdigest(), cols.hexdigest()


def external_info(t) -> dict[str, str]:
    """An initializer's external_data entries (location, offset, length); empty when inline."""
    return {e.key: e.value for e in t.external_data}


def read_external(base_dir: str, ext: dict[str, str]) -> bytes:
    """The bytes an external_data entry points at, in base_dir."""
    return b"".join(read_chunks(base_dir, ext))


def read_chunks(base_dir: str, ext: dict[str, str], chunk: int = 16 << 20):
    """The bytes an external_data entry points at, in base_dir, `chunk` at a time; a file that
    ends early is an error."""
    import os

    left, off = int(ext["length"]), int(ext.get("offset", 0))
    with open(os.path.join(base_dir, ext["location"]), "rb") as f:
        while left:
            b = os.pread(f.fileno(), min(left, chunk), off)
            if not b:
                raise OSError(f"{ext['location']} ends early at {off}")
            yield b
            left, off = left - len(b), off + len(b)


def _initializer_digests(graph, base_dir: str) -> dict[str, str]:
    """sha1 of each 2-D float initializer's values -> its name; one read at a time (an
    external one from its file in base_dir, leaving the proto as it is)."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import uses_external_data

    out = {}
    for t in graph.initializer:
        if t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            continue
        if uses_external_data(t):  # the file's bytes are the array's (little-endian, C order)
            h = hashlib.sha1()
            for chunk in read_chunks(base_dir, external_info(t)):
                h.update(chunk)
            out.setdefault(h.hexdigest(), t.name)
        else:
            out.setdefault(_digest(numpy_helper.to_array(t).astype(np.float32, copy=False)), t.name)
    return out


def _add(graph, name: str, a: np.ndarray) -> str:
    """`a` as a new initializer, made in the graph: numpy_helper.from_array's proto, appended,
    is one more copy of the array (a protobuf append copies the message)."""
    from onnx import helper

    t = graph.initializer.add()
    t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(a.dtype)
    t.dims.extend(a.shape)
    t.raw_data = np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()  # ONNX stores little-endian
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
    in place (an 8-bit one read by a MatMul as its two 4-bit planes, split8.py); returns how many
    float nodes were replaced. A tied table's codes are stored once, in MatMulNBits' shape, and
    its gather reads them through a Reshape. base_dir: where external initializers' files are."""
    from onnx import helper

    g = proto.graph
    ws = _weights(model)
    digests = _initializer_digests(g, base_dir) if ws else {}
    producer = {o: n for n in g.node for o in n.output}
    read_by_matmul = {id(w) for _, w, is_table in ws if not is_table}
    # node index -> the nodes that replace it (the graph is rebuilt once), and whose they are
    stored, new_at, owner = {}, {}, {}
    images_of = {}
    for path, w, is_table in ws:
        if id(w) not in images_of:
            images_of[id(w)] = image_digests(w)
        flat, transposed = images_of[id(w)]
        name = digests.get(flat if is_table else transposed)  # MatMul's B is the weight transposed
        table = digests.get(flat)  # a tied head may read the table through a Transpose
        if id(w) not in stored:
            stored[id(w)] = _initializers(g, path.replace("(tied)", ""), w, id(w) in read_by_matmul)
            trim_heap()  # the images and planes, freed once the graph holds its copies
        p, hits = stored[id(w)], 0
        for i, node in enumerate(g.node):
            if i in new_at:  # a weight object at two paths (shared layers) finds its nodes again
                hits += owner[i] == (id(w), is_table)
            elif is_table and node.op_type == "Gather" and name is not None and node.input[0] == name:
                new_at[i], owner[i], hits = _gather(g, node, w, p), (id(w), is_table), hits + 1
            elif not is_table and node.op_type == "MatMul" and _reads(node.input[1], name, table, producer):
                new_at[i], owner[i], hits = _matmul(node, w, p), (id(w), is_table), hits + 1
        if not hits:
            raise SlmcError(f"{path}: its float image was not found as a MatMul/Gather constant in the exported "
                            "graph, so its codes cannot be stored (an exporter change?)", "onnx")
    if new_at:
        nodes = [m for i, node in enumerate(g.node) for m in new_at.get(i, [node])]
        del g.node[:]
        g.node.extend(nodes)
    _prune(g)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(new_at)


def _initializers(g, key: str, w: QuantWeight, matmul: bool) -> dict:
    """The initializers one QuantWeight's ops read: in MatMulNBits' shapes when a MatMul reads
    it (codes [N, K/b, b*bits/8], zero points flat; 8 bits as planes), else in the gather's
    ([N, K*bits/8], zero points [N, ...])."""
    im = images(w)
    # the op's attributes and the initializers' names; not `im` itself: the graph holds its copy
    p = {"block": im.block, "matmul": matmul, "planes": matmul and w.bits == 8}
    p["s"] = _add(g, f"{key}.qscales", im.scales)
    if p["planes"]:
        pl = planes(im.codes, im.zeros)
        sixteen(g)
        p.update(hi=_add(g, f"{key}.qcodes_hi", pl.hi), lo=_add(g, f"{key}.qcodes_lo", pl.lo),
                 zh=None if pl.zh is None else _add(g, f"{key}.qzeros_hi", pl.zh.reshape(-1)),
                 zl=_add(g, f"{key}.qzeros_lo", pl.zl.reshape(-1)))
    else:
        n = w.shape[0]
        p["codes"] = _add(g, f"{key}.qcodes", im.codes if matmul else im.codes.reshape(n, -1))
        p["z"] = None if im.zeros is None else _add(g, f"{key}.qzeros", im.zeros.reshape(-1) if matmul else im.zeros)
    return p


def _matmul(node, w: QuantWeight, p: dict) -> list:
    from onnx import helper

    block = p["block"]
    if p["planes"]:
        return matmul_nodes(node.name, node.input[0], node.output[0], p, w.shape[1], w.shape[0], block)
    # accuracy_level=1: fp32 compute on the exactly dequantized weight (4 would quantize the
    # activations, see rules.py)
    ins = [node.input[0], p["codes"], p["s"]] + ([p["z"]] if p["z"] else [])
    return [helper.make_node("MatMulNBits", ins, list(node.output), name=node.name, domain=MS_DOMAIN,
                             K=w.shape[1], N=w.shape[0], bits=w.bits, block_size=block, accuracy_level=1)]


def _gather(g, node, w: QuantWeight, p: dict) -> list:
    """The quantized gather; codes stored in MatMulNBits' shape (a tied table) are read through
    Reshape nodes, which ONNX Runtime folds when it loads the model."""
    from onnx import helper

    block, out, pre = p["block"], [], []

    made = p.setdefault("rows", set())  # each Reshape once, before the first gather that reads it

    def rows(name):
        if not p["matmul"] or name is None:
            return name
        if name not in made:
            made.add(name)
            pre.append(helper.make_node("Reshape", [name, _rows_shape(g, w.shape[0])], [f"{name}.rows"],
                                        name=f"{name}.rows"))
        return f"{name}.rows"

    if p["planes"]:
        q = {**p, **{k: rows(p[k]) for k in ("hi", "lo", "zh", "zl")}}
        out = gather_nodes(node.name, node.input[1], node.output[0], q, block)
    else:
        ins = [rows(p["codes"]), node.input[1], p["s"]] + ([rows(p["z"])] if p["z"] else [])
        out = [helper.make_node("GatherBlockQuantized", ins, list(node.output), name=node.name, domain=MS_DOMAIN,
                                bits=w.bits, block_size=block, gather_axis=0, quantize_axis=1)]
    return pre + out


def _rows_shape(g, n: int) -> str:
    """An int64 initializer [n, -1]."""
    return constant(g, f"slmc.rows{n}", np.array([n, -1], np.int64))


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
    # deleted where they are: extend() would copy every kept one (the codes too) into the
    # graph's memory again, beside the old copies, which protobuf keeps until the proto goes
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in used:
            del g.initializer[i]
