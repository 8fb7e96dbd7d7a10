"""slmc's int4/int8 codes into the .tflite flatbuffer, unchanged.

litert_torch's converter that runs without TensorFlow stores every weight as a float
constant (torchao's dequantize ops would stay STABLEHLO_CUSTOM_CALL, which no LiteRT
interpreter runs). So the lowering gives each QuantWeight its exact dequantized float
(QuantWeight.float()), the converter copies those bytes unchanged, and this module finds
each such constant by its bytes and replaces it with the codes, in builtin ops every
LiteRT CPU runtime has. Float activations (act_bits=0), a matmul's weight W[out, in]:

  per channel (g = in):
    before  W  float32[out, in] constant ──► FULLY_CONNECTED
    after   C  int4|int8[out, in], per-axis scale + zero point (axis 0) ──► DEQUANTIZE ──► W
  groups (g < in), G = out * in / g:
    after   C  int4|int8[G, g] ──► DEQUANTIZE ──► [SUB Z float32[G, 1]] ──► MUL S float32[G, 1]
               ──► RESHAPE [out, in] ──► W

An EMBEDDING_LOOKUP of a quantized table reads only the looked-up rows: a hybrid lookup
of the codes C[V, K, g] (scale 1: exact integers), lookups of S (and Z) [V, K, 1], then
(c - z) * s and a reshape. int8 activations (act_bits=8): the codes become the
FULLY_CONNECTED filter itself, run as a dynamically quantized GEMM (XNNPACK qd8-f32-qc8w /
qb4w, ExecuTorch's 8da8w / 8da4w kernels; asymmetricQuantizeInputs so the builtin kernel
agrees):
    after   C  int8[out, in] per-axis scales ──► FULLY_CONNECTED (filter)
            C  int4[out, in] BlockwiseQuantization(S fp16[out, in / g], block g) ──► same

DEQUANTIZE of a constant runs once (the interpreter keeps its output); the grouped MUL and
RESHAPE run on every call: the price of exact float-activation math (README). Scales and
zeros are constant buffers shared by both signatures, so the file is params * bits / 8 +
scales; per-axis metadata for groups would be written once per signature, and
BlockwiseQuantization has no zero points and runs only in the int8-activation GEMMs.

Buffers are written after the flatbuffer table (Buffer.offset/size, 16-byte aligned), the
layout TFLite uses for models over 2 GiB: every kernel sees aligned data and packing
stays fast in Python. A QuantWeight whose float image is not found is an error, never a
silent float fallback.
"""

from __future__ import annotations

import gc
import hashlib
import io
import mmap
from pathlib import Path

import numpy as np
import torch

from ...compiler.ir import Model, QuantWeight, named_weights
from ...errors import SlmcError
from ..base import page_out_weights, scratch_file

_ALIGN = 16


def _digest(raw) -> bytes:
    return hashlib.blake2b(memoryview(raw).cast("B"), digest_size=20).digest()


def _float_image(w: QuantWeight) -> bytes:
    return w.float().contiguous().numpy().astype(np.float32, copy=False).tobytes()


def _signed_codes(w: QuantWeight, codes: torch.Tensor) -> np.ndarray:
    """Codes (a part of w's) in the signed int4/int8 range, and (_signed_zeros) zeros shifted
    alike: (c - z) unchanged."""
    c = codes.numpy().astype(np.int16)
    return c.astype(np.int8) if w.symmetric else (c - 2 ** (w.bits - 1)).astype(np.int8)


def _signed_zeros(w: QuantWeight) -> np.ndarray | None:
    return None if w.symmetric else w.zeros.float().numpy() - 2 ** (w.bits - 1)


class Deferred:
    """A buffer's bytes made only when the file is written, a part at a time (parts() yields
    arrays), so that no weight's codes are converted or packed whole (a 1B model's int4 table:
    0.9 GB of int16/int8/packed transients at once) and none before its turn."""

    def __init__(self, nbytes: int, parts):
        self.nbytes, self.parts = nbytes, parts


_PART = 1 << 23  # codes converted and packed at a time (even: int4 pairs never straddle parts)


def _stored_codes(w: QuantWeight) -> Deferred:
    flat, n = w.codes.reshape(-1), w.codes.numel()

    def parts():
        for lo in range(0, n, _PART):
            c = _signed_codes(w, flat[lo:lo + _PART])
            yield pack_int4(c) if w.bits == 4 else c.view(np.uint8)

    return Deferred((n + 1) // 2 if w.bits == 4 else n, parts)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """TFLite INT4: two codes per byte, the even index in the low nibble."""
    c = codes.reshape(-1).astype(np.uint8) & 0xF
    if c.size % 2:
        c = np.append(c, np.uint8(0))
    return (c[0::2] | (c[1::2] << 4)).astype(np.uint8)


class _Writer:
    """Adds tensors, buffers and ops to a ModelT (the schema's object API)."""

    def __init__(self, mt):
        from ai_edge_litert import schema_py_generated as S

        self.S, self.mt = S, mt
        self.deferred: dict[int, Deferred] = {}  # buffer index -> its bytes, made when written

    def buffer(self, arr: np.ndarray | Deferred) -> int:
        b = self.S.BufferT()
        if isinstance(arr, Deferred):
            self.deferred[len(self.mt.buffers)] = arr
        else:
            b.data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        self.mt.buffers.append(b)
        return len(self.mt.buffers) - 1

    def tensor(self, sg, name: bytes, shape, typ, buffer: int = 0, quant=None) -> int:
        t = self.S.TensorT()
        t.name, t.shape, t.type, t.buffer = name, np.array(shape, np.int32), typ, buffer
        t.quantization = quant
        sg.tensors.append(t)
        return len(sg.tensors) - 1

    def quant(self, scale: np.ndarray, zero: np.ndarray, axis: int = 0):
        q = self.S.QuantizationParametersT()
        q.scale, q.zeroPoint, q.quantizedDimension = scale.astype(np.float32), zero.astype(np.int64), axis
        return q

    def op(self, code: int, ins: list[int], outs: list[int], options: str | None = None):
        S, mt = self.S, self.mt
        idx = next((i for i, oc in enumerate(mt.operatorCodes)
                    if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code), None)
        if idx is None:
            oc = S.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
            mt.operatorCodes.append(oc)
            idx = len(mt.operatorCodes) - 1
        o = S.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = idx, np.array(ins, np.int32), np.array(outs, np.int32)
        if options:
            o.builtinOptionsType = getattr(S.BuiltinOptions, options)
            o.builtinOptions = getattr(S, options + "T")()
        return o


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal a part at a time, each part's pages let go (two 128k-row code tables in a
    scratch file would otherwise both be resident: +0.5 GB at Llama-3.2-1B)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    fa, fb = a.reshape(-1), b.reshape(-1)
    for lo in range(0, fa.numel(), _PART):
        if not torch.equal(fa[lo:lo + _PART], fb[lo:lo + _PART]):
            return False
        page_out_weights()
    return True


class _Stored:
    """One QuantWeight's model-level buffers (shared by every subgraph that reads it), each
    made on first use."""

    def __init__(self, wr: _Writer, entries: list[tuple[str, QuantWeight]]):
        path, w = entries[0]
        self.wr, self.path, self.w = wr, path, w
        for p, o in entries[1:]:  # e.g. an embedding and a head quantized alike from one tied table
            same = (o.bits, o.group_size, o.symmetric) == (w.bits, w.group_size, w.symmetric) and \
                _equal(o.codes, w.codes) and torch.equal(o.scales.float(), w.scales.float()) and \
                (o.zeros is None) == (w.zeros is None) and (o.zeros is None or torch.equal(o.zeros, w.zeros))
            if not same:
                raise SlmcError(f"{p} and {path} have one float image but different codes; "
                                "LiteRT's converter merged them into one constant", "tflite")
        # act_bits=8: matmuls read the codes as a quantized FULLY_CONNECTED filter
        self.filter = any(o.act_bits == 8 for _, o in entries)
        if self.filter and any(o.act_bits != 8 and p != "embed" for p, o in entries):
            raise SlmcError(f"{path}: one constant is read by matmuls with int8 and with float activations; "
                            "quantize them with the same act_bits", "tflite")
        self.paths = [p for p, _ in entries]
        zeros = _signed_zeros(w)
        out, inp = w.shape
        g = w.group_size
        self.rows, self.groups = out * inp // g, inp // g
        self.per_channel = g == inp
        self.codes = wr.buffer(_stored_codes(w))
        self.scale = w.scales.float().numpy().reshape(-1).astype(np.float32)
        self.zero = None if zeros is None else zeros.reshape(-1).astype(np.float32)
        if self.per_channel and self.zero is not None and not np.array_equal(self.zero, np.round(self.zero)):
            raise SlmcError(f"{path}: fractional zero points cannot be stored in a TFLite tensor", "tflite")
        if self.filter and not self.per_channel and \
                not np.array_equal(self.scale.astype(np.float16).astype(np.float32), self.scale):
            raise SlmcError(f"{path}: blockwise scales must be fp16 values for LiteRT's BlockwiseQuantization "
                            "(quantize with scale_dtype=bfloat16; some scale is outside fp16's range)", "tflite")
        self._bufs: dict[str, int] = {}
        self.used: set[str] = set()  # how graph ops read it, for the manifest

    def scales_tensor(self, sg, name: bytes, shape: list[int]) -> tuple[int, list]:
        """A float32 tensor of the scales: stored as fp16 when every scale is an fp16 value
        (half the bytes; DEQUANTIZE of a constant runs once), else as float32."""
        S, wr = self.wr.S, self.wr
        if not np.array_equal(self.scale.astype(np.float16).astype(np.float32), self.scale):
            return wr.tensor(sg, name + b"/scales", shape, S.TensorType.FLOAT32, self.buf("scales")), []
        half = wr.tensor(sg, name + b"/scales_fp16", shape, S.TensorType.FLOAT16, self.buf("scales_fp16"))
        out = wr.tensor(sg, name + b"/scales", shape, S.TensorType.FLOAT32)
        return out, [wr.op(S.BuiltinOperator.DEQUANTIZE, [half], [out])]

    def buf(self, what: str) -> int:
        if what not in self._bufs:
            arr = {"scales": self.scale, "zeros": self.zero, "scales_fp16": self.scale.astype(np.float16),
                   "shape": np.array(self.w.shape, np.int32)}[what]
            self._bufs[what] = self.wr.buffer(arr)
        return self._bufs[what]


def _dequantize(wr: _Writer, sg, ti: int, st: _Stored) -> list:
    """Ops that compute tensor `ti` (formerly the float constant) from st's codes."""
    S, w = wr.S, st.w
    name = sg.tensors[ti].name
    typ = S.TensorType.INT4 if w.bits == 4 else S.TensorType.INT8
    if st.per_channel:
        st.used.add("DEQUANTIZE per-axis (once)")
        zero = np.zeros(len(st.scale)) if st.zero is None else st.zero
        c = wr.tensor(sg, name + b"/codes", w.shape, typ, st.codes, wr.quant(st.scale, zero))
        return [wr.op(S.BuiltinOperator.DEQUANTIZE, [c], [ti])]
    st.used.add("DEQUANTIZE" + (" -> SUB zeros" if st.zero is not None else "") + " -> MUL scales -> RESHAPE")
    G, g = st.rows, w.group_size
    c = wr.tensor(sg, name + b"/codes", [G, g], typ, st.codes, wr.quant(np.ones(1), np.zeros(1)))
    x = wr.tensor(sg, name + b"/codes_f", [G, g], S.TensorType.FLOAT32)
    ops = [wr.op(S.BuiltinOperator.DEQUANTIZE, [c], [x])]
    if st.zero is not None:
        z = wr.tensor(sg, name + b"/zeros", [G, 1], S.TensorType.FLOAT32, st.buf("zeros"))
        y = wr.tensor(sg, name + b"/centered", [G, g], S.TensorType.FLOAT32)
        ops.append(wr.op(S.BuiltinOperator.SUB, [x, z], [y], "SubOptions"))
        x = y
    s, sops = st.scales_tensor(sg, name, [G, 1])
    ops += sops
    d = wr.tensor(sg, name + b"/dequantized", [G, g], S.TensorType.FLOAT32)
    ops.append(wr.op(S.BuiltinOperator.MUL, [x, s], [d], "MulOptions"))
    shp = wr.tensor(sg, name + b"/shape", [2], S.TensorType.INT32, st.buf("shape"))
    ops.append(wr.op(S.BuiltinOperator.RESHAPE, [d, shp], [ti]))
    return ops


def _lookup(wr: _Writer, sg, op, st: _Stored) -> list:
    """EMBEDDING_LOOKUP(ids, table) -> out, reading only the looked-up rows' codes: a hybrid
    lookup of the codes (scale 1, so exact integers), a lookup of their scales (and zeros),
    then (c - z) * s on [T, groups, g] and a reshape to out's shape."""
    S, w = wr.S, st.w
    ids, out = int(op.inputs[0]), int(op.outputs[0])
    shape = [int(d) for d in sg.tensors[out].shape]
    T, V, K, g = int(np.prod(shape[:-1])), w.shape[0], st.groups, w.group_size
    name = sg.tensors[out].name
    st.used.add("EMBEDDING_LOOKUP of codes and scales" + (" and zeros" if st.zero is not None else "")
                + " (looked-up rows only)")
    typ = S.TensorType.INT4 if w.bits == 4 else S.TensorType.INT8
    c = wr.tensor(sg, name + b"/codes", [V, K, g], typ, st.codes, wr.quant(np.ones(1), np.zeros(1)))
    x = wr.tensor(sg, name + b"/rows", [T, K, g], S.TensorType.FLOAT32)
    ops = [wr.op(S.BuiltinOperator.EMBEDDING_LOOKUP, [ids, c], [x])]
    if st.zero is not None:
        zt = wr.tensor(sg, name + b"/zeros", [V, K, 1], S.TensorType.FLOAT32, st.buf("zeros"))
        z = wr.tensor(sg, name + b"/row_zeros", [T, K, 1], S.TensorType.FLOAT32)
        y = wr.tensor(sg, name + b"/centered", [T, K, g], S.TensorType.FLOAT32)
        ops += [wr.op(S.BuiltinOperator.EMBEDDING_LOOKUP, [ids, zt], [z]),
                wr.op(S.BuiltinOperator.SUB, [x, z], [y], "SubOptions")]
        x = y
    stab, sops = st.scales_tensor(sg, name, [V, K, 1])
    ops += sops
    s = wr.tensor(sg, name + b"/row_scales", [T, K, 1], S.TensorType.FLOAT32)
    d = wr.tensor(sg, name + b"/dequantized", [T, K, g], S.TensorType.FLOAT32)
    shp = wr.tensor(sg, name + b"/shape", [len(shape)], S.TensorType.INT32, wr.buffer(np.array(shape, np.int32)))
    return ops + [wr.op(S.BuiltinOperator.EMBEDDING_LOOKUP, [ids, stab], [s]),
                  wr.op(S.BuiltinOperator.MUL, [x, s], [d], "MulOptions"),
                  wr.op(S.BuiltinOperator.RESHAPE, [d, shp], [out])]


def _rewrite_subgraph(wr: _Writer, mt, sg, stored: dict) -> None:
    """Lookups of a quantized table read its codes; int8-activation matmuls read them as their
    filter; any other reader gets the dequantized tensor, computed by ops placed first (their
    inputs are all constants)."""
    S = wr.S
    pre, ops, readers, filters = [], [], {}, {}
    for op in sg.operators:
        code = max(mt.operatorCodes[op.opcodeIndex].builtinCode, mt.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)
        table = int(op.inputs[1]) if len(op.inputs) > 1 else -1
        st = stored.get(sg.tensors[table].buffer) if table >= 0 else None
        if st is not None and code == S.BuiltinOperator.EMBEDDING_LOOKUP:
            ops += _lookup(wr, sg, op, st)
            continue
        for k, ti in enumerate(op.inputs):
            st = stored.get(sg.tensors[ti].buffer) if ti >= 0 else None
            if st is None:
                continue
            if not st.filter:
                readers.setdefault(int(ti), st)
            elif code == S.BuiltinOperator.FULLY_CONNECTED and k == 1:
                filters[int(ti)] = st
                if op.builtinOptions is None:
                    op.builtinOptionsType = S.BuiltinOptions.FullyConnectedOptions
                    op.builtinOptions = S.FullyConnectedOptionsT()
                op.builtinOptions.asymmetricQuantizeInputs = True  # per-row asymmetric, as XNNPACK's qd8
            else:
                raise SlmcError(f"{st.path}: an int8-activation weight must only be a matmul's weight in the "
                                "LiteRT graph (quantize it with act_bits=0 instead)", "tflite")
        ops.append(op)
    for ti, st in readers.items():
        pre += _dequantize(wr, sg, ti, st)
    for t in sg.tensors:
        if t.buffer in stored:
            t.buffer = 0
    for ti, st in filters.items():
        _as_filter(wr, sg, ti, st)
    sg.operators = pre + ops


def _as_filter(wr: _Writer, sg, ti: int, st: _Stored) -> None:
    """act_bits=8: tensor `ti` becomes the codes themselves, a quantized FULLY_CONNECTED filter."""
    S, t, w = wr.S, sg.tensors[ti], st.w
    out, inp = w.shape
    t.type, t.buffer = (S.TensorType.INT4 if w.bits == 4 else S.TensorType.INT8), st.codes
    if st.per_channel:
        st.used.add("FULLY_CONNECTED filter, per-axis scales, int8 dynamic activations")
        t.quantization = wr.quant(st.scale, np.zeros(out))
        return
    st.used.add("FULLY_CONNECTED filter, BlockwiseQuantization (fp16 scales), int8 dynamic activations")
    q = S.QuantizationParametersT()
    q.quantizedDimension, q.detailsType = 0, S.QuantizationDetails.BlockwiseQuantization
    d = S.BlockwiseQuantizationT()
    d.scales = wr.tensor(sg, t.name + b"/scales", [out, inp // w.group_size], S.TensorType.FLOAT16,
                         st.buf("scales_fp16"))
    d.zeroPoints, d.blockSize = -1, w.group_size
    q.details = d
    t.quantization = q


def store_codes(data: bytes | Path, model: Model) -> tuple[bytes | Path, dict]:
    """Replace the float image of every QuantWeight in `data` by its codes; returns the new
    flatbuffer and {path: how it is stored} for the manifest. A flatbuffer given as a file is
    read through a read-only mapping (its float buffers are never copied into RAM) and the
    new one is written to a file (base.scratch_file), returned as its Path."""
    quant = [(p, w) for p, w in named_weights(model) if isinstance(w, QuantWeight)]
    if not quant:
        return data, {}
    if not isinstance(data, Path):
        buf = io.BytesIO()
        layout = _store_codes(data, quant, buf)
        return buf.getvalue(), layout
    out = scratch_file(data.name)
    with open(data, "rb") as src, mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as mm, open(out, "wb") as f:
        layout = _store_codes(mm, quant, f)
        gc.collect()  # numpy views of the mapping (in cycles) go before it is closed
    return out, layout


def _store_codes(data, quant: list, f) -> dict:
    from ai_edge_litert import schema_py_generated as S

    mt = S.ModelT.InitFromPackedBuf(data, 0)
    raw = _buffers_raw(mt, data)
    wanted: dict[bytes, list[tuple[str, QuantWeight]]] = {}
    for p, w in quant:
        wanted.setdefault(_digest(_float_image(w)), []).append((p, w))
    sizes = {w.numel() * 4 for _, w in quant}
    groups: dict[int, list] = {}  # float buffer -> the weights whose image it is
    for bi, r in list(enumerate(raw)):
        if r is not None and len(r) in sizes and (key := _digest(r)) in wanted:
            groups[bi] = wanted[key]
    found = {id(e) for e in groups.values()}
    lost = [e[0][0] for e in wanted.values() if id(e) not in found]
    if lost:
        raise SlmcError(f"litert_torch did not store {len(lost)} quantized weight(s) as plain float constants "
                        f"(first: {lost[0]}); slmc cannot put their codes in the flatbuffer", "tflite")
    layout = put_codes(mt, raw, groups)
    _write_packed(mt, raw, f)
    return layout


def put_codes(mt, raw: list, groups: dict[int, list[tuple[str, QuantWeight]]]) -> dict:
    """In the model `mt` (buffers' bytes in `raw`, extended here with the new ones): every
    tensor of a float buffer in `groups` becomes its weights' codes (buffers given the same
    list share one set of codes); the float buffers are emptied. Returns {path: how stored}."""
    wr = _Writer(mt)
    shared: dict[int, _Stored] = {}  # id(list) -> its codes
    stored: dict[int, _Stored] = {}  # float buffer -> codes
    for bi, e in groups.items():
        if id(e) not in shared:
            shared[id(e)] = _Stored(wr, e)
            page_out_weights()  # the tables it read (scales; a tied pair's codes, compared)
        stored[bi] = shared[id(e)]
    for sg in mt.subgraphs:
        _rewrite_subgraph(wr, mt, sg, stored)
    n = len(raw)
    for bi in stored:
        mt.buffers[bi].data, raw[bi] = None, None
    raw += [wr.deferred.get(i) or (np.asarray(b.data) if b.data is not None else None)
            for i, b in enumerate(mt.buffers[n:], n)]
    return {p: {"codes": f"int{st.w.bits}", "group_size": st.w.group_size, "stored_as": "; ".join(sorted(st.used))}
            for st in shared.values() for p in st.paths}


def _buffers_raw(mt, data: bytes) -> list:
    """Each buffer's bytes (inline or at offset/size after the table), None when empty."""
    out = []
    for b in mt.buffers:
        if b.offset > 1:
            out.append(np.frombuffer(data, np.uint8, count=b.size, offset=b.offset))
        elif b.data is not None and len(b.data):
            out.append(np.asarray(b.data, dtype=np.uint8))
        else:
            out.append(None)
    return out


def _pack(mt, raw: list) -> bytes:
    """Serialize with every non-empty buffer appended after the table, 16-byte aligned."""
    buf = io.BytesIO()
    _write_packed(mt, raw, buf)
    return buf.getvalue()


def _write_packed(mt, raw: list, f, write=None) -> None:
    """_pack's bytes, written to the file `f` one buffer at a time; write(f, r) writes one
    (default: its bytes at once). A buffer is anything with .nbytes: an array, a tensor."""
    import flatbuffers

    for b, r in zip(mt.buffers, raw):
        b.data = None
        b.offset, b.size = (1, r.nbytes) if r is not None else (0, 0)  # 1: placeholder, rewritten below

    def table() -> bytes:
        fb = flatbuffers.Builder(1 << 20)
        fb.Finish(mt.Pack(fb), file_identifier=b"TFL3")
        return bytes(fb.Output())

    head = table()
    # the offsets are absolute; the table's size does not change when they do (fixed-width u64)
    pos, chunks = _aligned(len(head)), []
    for b, r in zip(mt.buffers, raw):
        if r is not None:
            b.offset = pos
            chunks.append((pos, r))
            pos = _aligned(pos + r.nbytes)
    again = table()
    assert len(again) == len(head), "offsets changed the table's size"
    f.write(again)
    at = len(again)
    for start, r in chunks:
        f.write(b"\0" * (start - at))
        if isinstance(r, Deferred):
            n = 0
            for part in r.parts():
                f.write(memoryview(np.ascontiguousarray(part)).cast("B"))
                n += part.nbytes
                # the codes' pages read to make this part (a mapped scratch file), and the freed
                # heap of its transients: after each part, not each buffer (a 128k-row table's
                # 250 MiB of codes were resident by its end; the LiteRT 1B rtn compile's peak)
                page_out_weights()
            assert n == r.nbytes, "a deferred buffer's size changed"
        else:
            write(f, r) if write else f.write(memoryview(r).cast("B"))
        at = start + r.nbytes
    f.write(b"\0" * (pos - at))


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
