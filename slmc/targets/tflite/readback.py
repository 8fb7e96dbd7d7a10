"""LiteRT readback: slmc's codes as INT4/INT8 tensors, each in the tensor the graph reads for
its weight, scales as per-axis metadata, BlockwiseQuantization or constants.

Finding a weight's bytes somewhere in the file is not enough: a tied table's codes are the
head's too, so a head whose own tensor holds other codes would still be "found" in the
embedding's buffer. So the graph is read (codes.py writes it):
- the head: the weight operand of the FULLY_CONNECTED / BATCH_MATMUL that produces each
  signature's `logits` (through shape-only ops), the codes tensor itself (int8 activations)
  or the one DEQUANTIZE [-> SUB zeros -> MUL scales -> RESHAPE] computes it from;
- the embedding: the table of each EMBEDDING_LOOKUP / GATHER of the `tokens` input;
- every other quantized weight: some tensor of codes read as a weight, with its scales, and
  as the FULLY_CONNECTED filter itself exactly when it has int8 activations;
- every tensor of codes in the file must hold some quantized weight's codes and scales: one
  that holds none is a FAIL naming the tensor.
A tied table stored once (two tensors sharing one buffer) or twice reads back alike: each
tensor is judged by the bytes of its own buffer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...compiler.ir import Model, QuantWeight, named_weights
from ..readback import Readback, signed_codes, tensor_bytes

_STEPS = 16  # ops traced through at most (a DEQUANTIZE chain is 4, a logits epilogue a few)


@dataclass
class _Use:
    """One tensor of int4/int8 codes and how the graph reads it."""

    where: str  # "decode tensor 10 'arith.constant25'"
    typ: int
    codes: bytes
    meta: set = field(default_factory=set)  # ("axis", scales, zero points) / ("block", fp16 scales, g) / ("const", type, bytes)
    table: bool = False  # the table of a lookup (a tied table may also be a matmul's weight)
    filter: bool = False  # itself a FULLY_CONNECTED filter: int8 dynamic activations
    readers: set = field(default_factory=set)  # (op, input) of the matmuls reading the weight


class _Graph:
    """One subgraph: producers, consumers, constants, and its tensors of codes."""

    def __init__(self, S, mt, sg, raw: list[bytes]):
        self.S, self.sg, self.raw = S, sg, raw
        self.name = (sg.name or b"").decode(errors="replace")
        self.codes = [max(mt.operatorCodes[op.opcodeIndex].builtinCode,
                          mt.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) for op in sg.operators]
        self.producer: dict[int, int] = {}
        self.consumers: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for oi, op in enumerate(sg.operators):
            for k, ti in enumerate(op.inputs if op.inputs is not None else ()):
                if ti >= 0:
                    self.consumers[int(ti)].append((oi, k))
            for ti in op.outputs if op.outputs is not None else ():
                self.producer[int(ti)] = oi
        ints = (S.TensorType.INT4, S.TensorType.INT8)
        self.uses = {ti: self._use(ti) for ti, t in enumerate(sg.tensors) if t.type in ints and self.data(ti)}

    def data(self, ti: int) -> bytes:
        return self.raw[self.sg.tensors[ti].buffer] if ti >= 0 else b""

    def where(self, ti: int) -> str:
        """'decode tensor 29 'LBlock_0/LAttention_attn/LLinear_k'': the converter fuses the
        names of merged ops with ';;' (the last one is the tensor's) and prefixes module paths."""
        name = re.sub(r"slmc(\.\w+)*\.", "", (self.sg.tensors[ti].name or b"").decode(errors="replace"))
        name = name.split(";;")[-1].rstrip(";")
        return f"{self.name} tensor {ti} '{'/'.join(name.split('/')[-3:])}'"

    def const(self, ti: int, lookups: bool = True, steps: int = _STEPS) -> tuple[int, bytes] | None:
        """(type, bytes) of the constant tensor `ti` is, or is a DEQUANTIZE (or, with
        `lookups`, a lookup's rows) of."""
        S = self.S
        if self.data(ti):
            return self.sg.tensors[ti].type, self.data(ti)
        oi = self.producer.get(ti)
        if oi is None or steps == 0:
            return None
        op, code = self.sg.operators[oi], self.codes[oi]
        if code == S.BuiltinOperator.DEQUANTIZE:
            return self.const(int(op.inputs[0]), lookups, steps - 1)
        if lookups and code in (S.BuiltinOperator.EMBEDDING_LOOKUP, S.BuiltinOperator.GATHER):
            table = op.inputs[1 if code == S.BuiltinOperator.EMBEDDING_LOOKUP else 0]
            return self.const(int(table), lookups, steps - 1)
        return None

    def _use(self, ti: int) -> _Use:
        S, t = self.S, self.sg.tensors[ti]
        u = _Use(self.where(ti), t.type, self.data(ti))
        q = t.quantization
        if q is not None and q.scale is not None and len(q.scale) > 1:
            u.meta.add(("axis", np.asarray(q.scale, np.float32).tobytes(), np.asarray(q.zeroPoint, np.int64).tobytes()))
        if q is not None and q.detailsType == S.QuantizationDetails.BlockwiseQuantization:
            u.meta.add(("block", self.data(int(q.details.scales)), int(q.details.blockSize)))
        chain = (S.BuiltinOperator.DEQUANTIZE, S.BuiltinOperator.SUB, S.BuiltinOperator.MUL, S.BuiltinOperator.RESHAPE)
        frontier, seen = [(ti, False)], 0  # (tensor, reached through a lookup: rows, not the weight)
        while frontier and seen < _STEPS:
            x, rows = frontier.pop()
            for oi, k in self.consumers.get(x, ()):
                seen += 1
                op, code = self.sg.operators[oi], self.codes[oi]
                if code == S.BuiltinOperator.FULLY_CONNECTED and k == 1 or code == S.BuiltinOperator.BATCH_MATMUL:
                    if not rows:
                        u.readers.add((oi, k))
                        u.filter |= x == ti and code == S.BuiltinOperator.FULLY_CONNECTED
                    continue
                lookup = (code == S.BuiltinOperator.EMBEDDING_LOOKUP and k == 1) or \
                    (code == S.BuiltinOperator.GATHER and k == 0)
                if lookup and x == ti:
                    u.table = True
                elif code not in chain:
                    continue
                for j, other in enumerate(op.inputs):
                    if j != k and other >= 0 and not lookup and (c := self.const(int(other))) is not None:
                        u.meta.add(("const",) + c)
                frontier.append((int(op.outputs[0]), rows or lookup))
        return u

    def through(self, ti: int) -> tuple[int | None, int]:
        """Back from `ti` through ops with one non-constant input: (op that stopped it or
        None, the tensor reached)."""
        S = self.S
        for _ in range(_STEPS):
            oi = self.producer.get(ti)
            if oi is None or self.codes[oi] in (S.BuiltinOperator.FULLY_CONNECTED, S.BuiltinOperator.BATCH_MATMUL,
                                                 S.BuiltinOperator.EMBEDDING_LOOKUP, S.BuiltinOperator.GATHER):
                return oi, ti
            live = [int(i) for i in self.sg.operators[oi].inputs if i >= 0 and self.const(int(i), False) is None]
            if len(live) != 1:
                return oi, ti
            ti = live[0]
        return None, ti


def _load(artifact: Path):
    from ai_edge_litert import schema_py_generated as S

    data = Path(artifact).read_bytes()
    mt = S.ModelT.InitFromPackedBuf(bytearray(data), 0)
    raw = []
    for b in mt.buffers:
        if b.offset > 1:
            raw.append(data[b.offset:b.offset + b.size])
        else:
            raw.append(b"" if b.data is None else np.asarray(b.data, np.uint8).tobytes())
    graphs = [_Graph(S, mt, sg, raw) for sg in mt.subgraphs]
    sigs = [(graphs[s.subgraphIndex], {m.name.decode(): int(m.tensorIndex) for m in s.inputs or ()},
             {m.name.decode(): int(m.tensorIndex) for m in s.outputs or ()}) for s in mt.signatureDefs or ()]
    return S, graphs, sigs


@dataclass(frozen=True)
class _Image:
    """What the artifact must hold for one QuantWeight (codes.py's layout)."""

    typ: int
    codes: bytes
    s32: bytes
    s16: bytes | None  # the scales as fp16 when every one is an fp16 value
    zeros: bytes | None  # float32, shifted like the codes (None: symmetric)
    axis_zeros: bytes  # int64 per-axis zero points (per channel)
    per_channel: bool
    group: int

    @classmethod
    def of(cls, S, w: QuantWeight) -> _Image:
        codes = signed_codes(w).numpy().astype(np.int8).reshape(-1)
        if w.bits == 4:
            nib = codes.astype(np.uint8) & 0xF
            nib = np.append(nib, np.uint8(0)) if nib.size % 2 else nib
            image, typ = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes(), S.TensorType.INT4
        else:
            image, typ = codes.tobytes(), S.TensorType.INT8
        s32 = w.scales.float().numpy()
        s16 = s32.astype(np.float16)
        z = None if w.zeros is None else (w.zeros.float() - 2 ** (w.bits - 1)).numpy()
        axis = np.zeros(w.shape[0], np.int64) if z is None else z.astype(np.int64)
        return cls(typ, image, s32.tobytes(), s16.tobytes() if np.array_equal(s16.astype(np.float32), s32) else None,
                   None if z is None else tensor_bytes(w.zeros.float() - 2 ** (w.bits - 1)), axis.tobytes(),
                   w.group_size == w.shape[1], w.group_size)


def _mismatch(S, u: _Use, im: _Image) -> str | None:
    """What of `im` tensor `u` does not hold (None: codes and scales all there)."""
    if u.typ != im.typ or u.codes != im.codes:
        return "codes"
    f32, f16 = S.TensorType.FLOAT32, S.TensorType.FLOAT16
    consts = (("const", f32, im.s32) in u.meta or im.s16 is not None and ("const", f16, im.s16) in u.meta) and \
        (im.zeros is None or ("const", f32, im.zeros) in u.meta)
    if consts:
        return None
    if im.per_channel:  # or the tensor's per-axis scales and zero points
        return None if ("axis", im.s32, im.axis_zeros) in u.meta else "per-axis scales/zero points"
    if im.zeros is None and im.s16 is not None and ("block", im.s16, im.group) in u.meta:
        return None  # BlockwiseQuantization: fp16 scales, no zero points
    return "scales" if im.zeros is None else "scales or zero points"


def _mode(u: _Use, w: QuantWeight) -> str | None:
    if w.act_bits == 8 and not u.filter:
        return "which is not the FULLY_CONNECTED filter itself (int8 activations) but dequantized to float"
    if w.act_bits != 8 and u.filter:
        return "a FULLY_CONNECTED filter (int8 dynamic activations), but the weight has float activations"
    return None


def _judge(S, u: _Use, path: str, w: QuantWeight, im: _Image, what: str, matmul: bool) -> str | None:
    why = _mismatch(S, u, im)
    if why:
        return f"{path}: {what} reads {u.where}, whose {why} are not the reference's"
    why = _mode(u, w) if matmul else None
    return f"{path}: {what} reads {u.where}, {why}" if why else None


def readback(model: Model, artifact: Path) -> Readback:
    """Each QuantWeight's codes (INT4: two's-complement nibbles, even index low; or INT8) with
    its scales, in the tensor the graph reads for it (module docstring); every tensor of codes
    accounted for by a QuantWeight."""
    S, graphs, sigs = _load(Path(artifact))
    quant = [(p, w) for p, w in named_weights(model) if isinstance(w, QuantWeight)]
    images = {id(w): _Image.of(S, w) for _, w in quant}
    embed = model.embed if isinstance(model.embed, QuantWeight) else None
    head_w = model.embed if model.lm_head is None else model.lm_head.weight
    head = ("lm_head(tied)" if model.lm_head is None else "lm_head.weight") if isinstance(head_w, QuantWeight) else None
    bad: dict[str, str] = {}  # path -> the first reason
    named: set[tuple[int, bytes]] = set()  # the codes of tensors those reasons name

    def judge(path: str, u: _Use, w: QuantWeight, what: str, matmul: bool) -> None:
        why = _judge(S, u, path, w, images[id(w)], what, matmul)
        if why and path not in bad:
            bad[path] = why
            named.add((u.typ, u.codes))

    if head is not None:
        logits = [(g, out["logits"]) for g, _, out in sigs if "logits" in out]
        if not logits:
            bad[head] = f"{head}: no signature returns logits, so no tensor is read as the head"
        for g, ti in logits:
            oi, _ = g.through(ti)
            if oi is None or g.codes[oi] not in (S.BuiltinOperator.FULLY_CONNECTED, S.BuiltinOperator.BATCH_MATMUL):
                bad.setdefault(head, f"{head}: {g.name}'s logits do not come from a FULLY_CONNECTED / BATCH_MATMUL")
                continue
            use = next((u for u in g.uses.values() if any(r[0] == oi for r in u.readers)), None)
            if use is None:
                bad.setdefault(head, f"{head}: {g.name}'s logits matmul reads no int codes (a float weight)")
            else:
                judge(head, use, head_w, f"{g.name}'s logits matmul", True)
    if embed is not None:
        tables = [(g, t) for g, ins, _ in sigs if "tokens" in ins for t in _token_tables(S, g, ins["tokens"])]
        if not tables:
            bad["embed"] = "embed: no lookup of the tokens reads int codes"
        for g, t in tables:
            judge("embed", g.uses[t], embed, f"{g.name}'s lookup of the tokens", False)
    uses = [u for g in graphs for u in g.uses.values()]
    by_codes: dict[tuple[int, bytes], list[_Use]] = defaultdict(list)
    for u in uses:
        by_codes[(u.typ, u.codes)].append(u)
    for p, w in quant:
        if w is embed or p in bad:
            continue  # the embedding is judged in its lookups above (the head there too, and here)
        im = images[id(w)]
        weights = [u for u in by_codes.get((im.typ, im.codes), ()) if u.readers or not u.table]
        held = [u for u in weights if _mismatch(S, u, im) is None]
        if not weights:
            bad[p] = f"{p}: codes not stored unchanged in any int{w.bits} tensor read as a weight"
        elif not held:
            judge(p, weights[0], w, "a matmul", True)
        elif all(_mode(u, w) for u in held):
            judge(p, held[0], w, "a matmul", True)
    rb = Readback(checked=len(quant))
    rb.missing = [bad.pop(p) for p, _ in quant if p in bad] + list(bad.values())  # + lm_head(tied)
    by_image = defaultdict(list)
    for _, w in quant:
        by_image[(images[id(w)].typ, images[id(w)].codes)].append(images[id(w)])
    for u in uses:  # every tensor of codes holds some weight's codes and scales (or a reason above names it)
        if (u.typ, u.codes) not in named and not any(_mismatch(S, u, im) is None
                                                     for im in by_image.get((u.typ, u.codes), ())):
            named.add((u.typ, u.codes))
            rb.missing.append(f"{u.where}: int{4 if u.typ == S.TensorType.INT4 else 8} codes that are no quantized "
                              "weight of the reference (codes or scales differ)")
    return rb


def _token_tables(S, g: _Graph, tokens: int) -> list[int]:
    """The int-code tables of the lookups (EMBEDDING_LOOKUP / GATHER) whose ids are the
    `tokens` input (through shape-only ops)."""
    out = []
    for oi, op in enumerate(g.sg.operators):
        code = g.codes[oi]
        if code == S.BuiltinOperator.EMBEDDING_LOOKUP:
            ids, table = int(op.inputs[0]), int(op.inputs[1])
        elif code == S.BuiltinOperator.GATHER:
            ids, table = int(op.inputs[1]), int(op.inputs[0])
        else:
            continue
        if table in g.uses and g.through(ids)[1] == tokens:
            out.append(table)
    return out
