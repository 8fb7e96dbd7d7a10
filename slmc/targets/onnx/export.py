"""The lowered decoder as one ONNX graph in onnxruntime-genai's decoder conventions.

Names and layouts follow onnxruntime-genai's model builder (src/python/py/models/builders/
base.py) and its runtime (src/models/position_inputs.cpp, kv_cache.cpp):
- inputs `input_ids` int64 [1, sequence_length], `position_ids` int64 [1, sequence_length],
  `past_key_values.{i}.key` / `.value`; outputs `logits` [1, sequence_length, vocab] (the
  runtime picks the last row itself) and `present.{i}.key` / `.value`;
- caches are [batch, kv_heads, seq, head_dim]. slmc's caches have a fixed length (max_len):
  past and present have the same shape and the runtime binds them to one buffer
  (`past_present_share_buffer`, as the builder sets for its static-cache GroupQueryAttention
  graphs), not growing past/present tensors. Row p of a cache holds position p; a call
  writes its rows at `position_ids` and returns the whole cache.
- no `attention_mask` input (genai treats it as optional): batch is 1, and the causal and
  per-layer sliding-window masks are built inside from `position_ids`, as in every slmc target.

Exported with the dynamo exporter (torch.export + onnxscript): the shared lowering exports
through torch.export already (every other target relies on it), so the same graph goes in.
torch.onnx.export is given the ExportedProgram, because its own argument flattening rejects
dynamic_shapes for the variadic cache arguments.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.export import Dim

from ...compiler.ir import Model
from ...compiler.lowering import LoweredLM, LoweringSpec, max_chunk
from ...compiler.lowering.attention import RowCacheAttention
from ...compiler.lowering.components import Components
from ...compiler.lowering.layers import LNorm
from ...compiler.spill import page_out_weights
from ..base import scratch_file
from .codes import external_info, quantize_graph, read_chunks, read_external

OPSET = 18
SEQ = "sequence_length"
DATA_FILE = "model.onnx.data"
# genai's name templates (layer index as %d), filled with "key" or "value"
PAST, PRESENT = "past_key_values.%%d.%s", "present.%%d.%s"
# Above this many bytes of weights, they go to model.onnx.data (protobuf caps a file at 2 GiB;
# the builder always splits, small test models stay one file).
EXTERNAL_DATA_BYTES = 64 << 20
INLINE_BYTES = 1024 - 33  # onnx.save_model's size_threshold, which counts sys.getsizeof(bytes)
STAGE_FILE = "staged.data"  # the weights while the graph is rewritten (a temporary folder)
COPY_CHUNK = 16 << 20
_NUMPY_DTYPES = (torch.float32, torch.float16, torch.int8, torch.uint8, torch.int32, torch.int64)


def cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    """(past names, present names) in forward's order: layer 0 key, layer 0 value, ..."""
    past = [PAST % c % i for i in range(n_layers) for c in ("key", "value")]
    present = [PRESENT % c % i for i in range(n_layers) for c in ("key", "value")]
    return past, present


def _scatter_rows(cache, axis: int, positions, rows):
    """The new rows at their positions as one ScatterElements along the cache's axis: index_copy
    exports as a ScatterND on the cache transposed to put that axis first, and back, which
    moved the whole cache twice per K/V per layer and step."""
    shape = [1] * cache.dim()
    shape[axis] = -1
    return cache.scatter(axis, positions.reshape(shape).expand_as(rows), rows)


class ReduceNorm(LNorm):
    """The norm component: RMSNorm as Pow, ReduceMean, Add, Sqrt, Div and Mul, the pattern
    ONNX Runtime fuses into one SimplifiedLayerNormalization when it loads the model (the
    shared LNorm's mean as a 1-row linear, for XNNPACK, stays ten separate ops here)."""

    def forward(self, x):
        if self.channels_first:
            return super().forward(x)
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (self.weight + self.offset)


def lowering_spec() -> LoweringSpec:
    # caches as inputs/outputs, every token's position given, logits of every position;
    # QuantWeights as their exact dequantized floats, which codes.py swaps for slmc's codes
    return LoweringSpec(kv="io", positions="tokens", full_logits=True, dequantize=True,
                        components=Components(norm=ReduceNorm, attention=RowCacheAttention(write_rows=_scatter_rows)))


class GenAIDecoder(nn.Module):
    """forward(input_ids[1, S], position_ids[1, S], *past) -> (logits[1, S, V], *present)."""

    def __init__(self, lm: LoweredLM):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, *past):
        return self.lm(input_ids, position_ids[0], *past)


def _exported_program(model: Model):
    lm = LoweredLM(model, lowering_spec()).eval()
    caches = tuple(lm.empty_caches())
    # a dynamic length of 2 as the example: 1 would be specialised as a constant
    args = (torch.zeros(1, 2, dtype=torch.int64), torch.arange(2).reshape(1, 2), *caches)
    seq = Dim("seq", max=max_chunk(model))
    shapes = ({1: seq}, {1: seq}, tuple(None for _ in caches))
    with torch.no_grad():
        return torch.export.export(GenAIDecoder(lm).eval(), args, dynamic_shapes=shapes, strict=False), args


def _name_dims(proto) -> None:
    """The exporter names the dynamic axis after its symbol (s70 ...): name it as genai does."""
    for vi in list(proto.graph.input) + list(proto.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = SEQ


def graph_io(proto) -> dict:
    """The graph's inputs and outputs: name, dtype, shape (dynamic axes by name)."""
    import onnx

    def desc(vi):
        t = vi.type.tensor_type
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    return {"inputs": [desc(v) for v in proto.graph.input], "outputs": [desc(v) for v in proto.graph.output]}


def export_onnx(model: Model) -> tuple[dict[str, Path], dict]:
    """({"model.onnx": ..., and "model.onnx.data" when the weights are large} as files in the
    scratch folder (base.scratch_file), graph_io); the same bytes for the same IR.

    The exporter's graph holds the lowering's weights; each is written to a staging file as
    it is read (its pages let go after), and the graph refers to it there, so the proto is
    made, rewritten (codes.py) and saved without a copy of the weights in RAM; the data file
    is assembled from the staging file, tensor by tensor, in initializer order."""
    import tempfile

    import onnx
    from onnx_ir import external_data

    ep, args = _exported_program(model)
    past, present = cache_names(model.n_layers)
    with torch.no_grad():
        prog = torch.onnx.export(ep, args, dynamo=True, input_names=["input_ids", "position_ids", *past],
                                 output_names=["logits", *present], opset_version=OPSET, optimize=True,
                                 verbose=False)
    del ep, args
    _write_in_chunks(prog.model)
    with tempfile.TemporaryDirectory(prefix="slmc-onnx-") as stage:
        external_data.unload_from_model(prog.model, stage, STAGE_FILE, callback=lambda t, info: page_out_weights())
        proto = prog.model_proto
        del prog
        page_out_weights()
        quantize_graph(proto, model, stage)
        _name_dims(proto)
        _strip_host_paths(proto)
        path = scratch_file("model.onnx")  # files, not bytes: no second copy of the weights in RAM
        _place_tensors(proto, stage, path.parent)
        onnx.save_model(proto, os.fspath(path))
    return {p.name: p for p in sorted(path.parent.iterdir())}, graph_io(proto)


def _write_in_chunks(ir_model) -> None:
    """The exporter writes a weight with one write() of its whole (file-mapped) storage, so a
    big one, like the 113 MiB tied table of SmolLM2, is resident at once on top of the graph;
    written COPY_CHUNK at a time, each chunk's pages go before the next is read."""
    import numpy as np

    for value in ir_model.graph.initializers.values():
        t = value.const_value
        raw = getattr(t, "raw", None)
        if not isinstance(raw, torch.Tensor) or raw.nbytes <= COPY_CHUNK or raw.dtype not in _NUMPY_DTYPES \
                or sys.byteorder != "little":  # the exporter's own tofile handles the rest
            continue

        def tofile(file, raw=raw):
            flat = memoryview(np.ascontiguousarray(raw.detach().numpy()).reshape(-1).view(np.uint8))
            for a in range(0, len(flat), COPY_CHUNK):
                file.write(flat[a:a + COPY_CHUNK])
                page_out_weights()

        t.tofile = tofile  # this tensor only (an instance attribute over TorchTensor.tofile)


def _strip_host_paths(proto) -> None:
    """Nothing host-specific in the file: no doc string, and no node's Python stack trace
    (the exporter records each node's source lines, with this machine's paths)."""
    proto.doc_string = ""
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if not p.key.endswith("stack_trace")]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def _place_tensors(proto, stage: str, out_dir: Path) -> None:
    """Each staged initializer back into the graph, or, when the weights are over
    EXTERNAL_DATA_BYTES, those of INLINE_BYTES or more into DATA_FILE in out_dir, packed in
    initializer order (as onnx.save_model's save_as_external_data lays them out)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    inits = list(proto.graph.initializer)
    size = sum(int(external_info(t)["length"]) if uses_external_data(t) else len(t.raw_data) for t in inits)
    data = open(out_dir / DATA_FILE, "wb") if size > EXTERNAL_DATA_BYTES else None
    try:
        for t in inits:
            ext = external_info(t) if uses_external_data(t) else None
            n = int(ext["length"]) if ext else len(t.raw_data)
            if data is None or n < INLINE_BYTES:
                if ext:
                    raw = read_external(stage, ext)
                    del t.external_data[:]
                    t.ClearField("data_location")
                    t.raw_data = raw
                continue
            offset = data.tell()
            if ext:
                _copy(stage, ext, data)
            else:
                data.write(t.raw_data)
                t.ClearField("raw_data")
            del t.external_data[:]  # as onnx's set_external_data writes them
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", DATA_FILE), ("offset", offset), ("length", n)):
                t.external_data.add(key=k, value=str(v))
    finally:
        if data is not None:
            data.close()


def _copy(stage: str, ext: dict, out) -> None:
    """A staged tensor's bytes appended to `out`, a chunk at a time."""
    for chunk in read_chunks(stage, ext, COPY_CHUNK):
        out.write(chunk)
