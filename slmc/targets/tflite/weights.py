"""The weight matrices go around litert_torch's converter, not through it.

litert_torch holds every constant it converts: the MLIR module reads each weight (its pages
stay resident) and the flatbuffer exporter builds the whole file, weights included, in one
in-memory buffer before writing it. On SmolLM2-135M that put LiteRT's compile at 2.2 GiB for
513 MiB of fp32 weights (bench/results/memory.md). So each matrix (every float parameter of two
or more dimensions: projections, embedding tables, experts) becomes an input of both
signatures while converting, and is put back afterwards as one constant buffer both
signatures share, streamed into the file a chunk at a time:

  while converting (decode; prefill alike)
    input slmc_weight_3 float32[576, 576] ──► FULLY_CONNECTED (filter)
  after splice()
    const float32[576, 576], buffer 41 (shared with prefill's tensor) ──► FULLY_CONNECTED

The converter makes the same ops either way (an input filter is not folded or transposed; with
lightweight_conversion a constant one is not either): tests/test_tflite_weights.py compares
the op lists, the signatures and both signatures' outputs with a conversion that kept the
weights as constants. A tied table is one parameter, so it is one input and one buffer.
litert_torch clamps an infinite weight to the dtype's largest finite value; so does this.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ...compiler.ir import Model, QuantWeight, named_weights
from ...compiler.spill import page_out_weights
from ...errors import SlmcError
from ..base import scratch_file
from .codes import _digest

PREFIX = "slmc_weight"  # litert_torch names a dict kwarg's entries {kwarg}_{key}
_NAME = re.compile(rf"^{PREFIX}_(\d+)$")
_CHUNK = 16 << 20  # bytes written (and then let go) at a time
_TYPES = {torch.float32: "FLOAT32", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16"}


def lifted_weights(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, tensor) of each matrix the conversion takes as an input; a parameter
    shared by two modules (a tied embedding and head) appears once."""
    return [(n, p.detach()) for n, p in module.named_parameters()
            if p.dim() >= 2 and p.dtype in _TYPES]


class Lifted(nn.Module):
    """`sig` with its matrices taken from the extra kwarg `slmc_weight={"0": W0, ...}`.

    `sig` is held outside the module tree: torch.export lists every parameter of the module it
    exports, used or not, and litert_torch inlines each listed one as a constant before dead
    code goes, which would read (and hold) every matrix after all. Its other parameters and
    its buffers are registered here instead, so they stay constants as before."""

    def __init__(self, sig: nn.Module, names: list[str]):
        super().__init__()
        object.__setattr__(self, "sig", sig)  # not a submodule
        self.names = names
        lifted = set(names)
        self.keep: dict[str, str] = {}  # sig's name -> the name registered here
        for n, p in sig.named_parameters():
            if n not in lifted:
                self.keep[n] = "p_" + n.replace(".", "__")
                self.register_parameter(self.keep[n], p)
        for n, b in sig.named_buffers():  # a constant either way: whether it is saved doesn't matter
            self.keep[n] = "b_" + n.replace(".", "__")
            self.register_buffer(self.keep[n], b, persistent=False)

    def forward(self, tokens, input_pos, kv_cache, slmc_weight):
        tensors = {n: getattr(self, r) for n, r in self.keep.items()}
        tensors |= {n: slmc_weight[str(i)] for i, n in enumerate(self.names)}
        return torch.func.functional_call(self.sig, tensors, (tokens, input_pos, kv_cache))


def sample_weights(weights: list[tuple[str, torch.Tensor]]) -> dict:
    return {str(i): w for i, (_, w) in enumerate(weights)}


def quant_groups(model: Model, lm: nn.Module, weights: list[tuple[str, torch.Tensor]]) -> dict[int, list]:
    """{index in `weights`: [(IR path, QuantWeight), ...]} for each lifted float image of a
    QuantWeight (the lowering's dequantized Parameter, lm.ir_params). Weights with equal codes
    get the same list, so their codes are stored once (codes.put_codes)."""
    names = {id(p): n for n, p in lm.named_parameters()}
    at = {n: i for i, (n, _) in enumerate(weights)}
    alike: dict[tuple, list] = {}
    out: dict[int, list] = {}
    for path, w in named_weights(model):
        if not isinstance(w, QuantWeight):
            continue
        i = at.get(names.get(id(lm.ir_params.get(id(w)))))
        if i is None:
            raise SlmcError(f"{path}: its float image is not one of the weights lifted around the converter", "tflite")
        key = (w.bits, w.group_size, w.symmetric, tuple(w.shape),
               *(None if t is None else (_digest(t.contiguous().numpy()), str(t.dtype))
                 for t in (w.codes, w.scales.float(), None if w.zeros is None else w.zeros.float())))
        out[i] = alike.setdefault(key, [])
        out[i].append((path, w))
        page_out_weights()  # the digest read every code: a model's tables are not all resident at once
    return out


def splice(path: Path, weights: list[tuple[str, torch.Tensor]], quant: dict[int, list] | None = None) -> tuple[Path, dict]:
    """The converted flatbuffer at `path` with each `slmc_weight_i` input of every signature
    made a constant of weights[i] (one buffer for all signatures); written to a new scratch
    file a chunk of each weight at a time. quant (quant_groups): those weights' codes go in
    instead of their float images (codes.py), which are never written. Returns the file and
    {IR path: how its codes are stored}."""
    from ai_edge_litert import schema_py_generated as S

    from .codes import _buffers_raw, _write_packed, put_codes

    quant = quant or {}

    out = scratch_file(path.name)
    data = path.read_bytes()  # the graph and its small constants: the matrices are not in it
    mt = S.ModelT.InitFromPackedBuf(data, 0)
    raw = _buffers_raw(mt, data)
    buffers: dict[int, int] = {}  # weight index -> its buffer
    for sd in mt.signatureDefs or []:
        sg = mt.subgraphs[sd.subgraphIndex]
        keep = []
        for tm in sd.inputs:
            m = _NAME.match(tm.name.decode())
            if not m:
                keep.append(tm)
                continue
            i = int(m.group(1))
            if i >= len(weights):
                raise SlmcError(f"the converted model has an input {tm.name.decode()!r} but only "
                                f"{len(weights)} weights were lifted", "tflite")
            name, w = weights[i]
            t = sg.tensors[tm.tensorIndex]
            want = getattr(S.TensorType, _TYPES[w.dtype])
            if list(t.shape) != list(w.shape) or t.type != want:
                typ = next((k for k, v in vars(S.TensorType).items() if v == t.type), t.type)
                raise SlmcError(f"litert_torch made weight {name} ({_TYPES[w.dtype]} {list(w.shape)}) a "
                                f"{typ} {[int(x) for x in t.shape]} input; slmc cannot put it back", "tflite")
            if i not in buffers:
                mt.buffers.append(S.BufferT())
                buffers[i] = len(mt.buffers) - 1
                raw.append(None if i in quant else w)
            t.buffer = buffers[i]
            sg.inputs = np.array([x for x in sg.inputs if x != tm.tensorIndex], np.int32)
        sd.inputs = keep
    for sg in mt.subgraphs:  # a lifted input outside every signature would be left unfed
        left = [sg.tensors[x].name.decode() for x in sg.inputs if PREFIX.encode() in sg.tensors[x].name]
        if left:
            raise SlmcError(f"litert_torch kept {len(left)} weight input(s) outside the signatures "
                            f"(first {left[0]!r}); slmc cannot put them back", "tflite")
    layout = put_codes(mt, raw, {buffers[i]: e for i, e in quant.items() if i in buffers}) if quant else {}
    with open(out, "wb") as f:
        _write_packed(mt, raw, f, write=_write_weight)
    page_out_weights()
    return out, layout


def _write_weight(f, r) -> None:
    """A tensor's bytes, a chunk at a time, infinities clamped as litert_torch clamps them;
    each chunk's pages (the checkpoint's or the spill's mapping) are let go once written."""
    if not isinstance(r, torch.Tensor):
        f.write(memoryview(r).cast("B"))
        return
    flat = r.reshape(-1)
    step = max(1, _CHUNK // flat.element_size())
    for lo in range(0, flat.numel(), step):
        c = flat[lo:lo + step]
        if c.is_floating_point() and torch.isinf(c).any():
            info = torch.finfo(c.dtype)
            c = c.clamp(info.min, info.max)
        f.write(memoryview(c.contiguous().view(torch.uint8).numpy()))
        page_out_weights()

