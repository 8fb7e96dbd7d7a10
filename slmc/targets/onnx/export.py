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
from pathlib import Path

import torch
import torch.nn as nn
from torch.export import Dim

from ...compiler.ir import Model
from ...compiler.lowering import LoweredLM, LoweringSpec, max_chunk
from ...compiler.spill import page_out_weights
from ..base import scratch_file
from .codes import quantize_graph

OPSET = 18
SEQ = "sequence_length"
DATA_FILE = "model.onnx.data"
# genai's name templates (layer index as %d), filled with "key" or "value"
PAST, PRESENT = "past_key_values.%%d.%s", "present.%%d.%s"
# Above this many bytes of weights, they go to model.onnx.data (protobuf caps a file at 2 GiB;
# the builder always splits, small test models stay one file).
EXTERNAL_DATA_BYTES = 64 << 20


def cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    """(past names, present names) in forward's order: layer 0 key, layer 0 value, ..."""
    past = [PAST % c % i for i in range(n_layers) for c in ("key", "value")]
    present = [PRESENT % c % i for i in range(n_layers) for c in ("key", "value")]
    return past, present


def lowering_spec() -> LoweringSpec:
    # caches as inputs/outputs, every token's position given, logits of every position;
    # QuantWeights as their exact dequantized floats, which codes.py swaps for slmc's codes
    return LoweringSpec(kv="io", positions="tokens", full_logits=True, dequantize=True)


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
    scratch folder (base.scratch_file), graph_io); the same bytes for the same IR."""
    import onnx

    ep, args = _exported_program(model)
    past, present = cache_names(model.n_layers)
    with torch.no_grad():
        prog = torch.onnx.export(ep, args, dynamo=True, input_names=["input_ids", "position_ids", *past],
                                 output_names=["logits", *present], opset_version=OPSET, optimize=True,
                                 verbose=False)
    proto = prog.model_proto
    del prog, ep, args
    # the proto holds its own copy of every weight now: the lowering's (file-mapped) pages go
    page_out_weights()
    quantize_graph(proto, model)
    _name_dims(proto)
    proto.doc_string = ""  # nothing host-specific in the file
    weights = sum(t.ByteSize() for t in proto.graph.initializer)
    path = scratch_file("model.onnx")  # files, not bytes: no second copy of the weights in RAM
    onnx.save_model(proto, os.fspath(path), save_as_external_data=weights > EXTERNAL_DATA_BYTES,
                    all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
    return {p.name: p for p in sorted(path.parent.iterdir())}, graph_io(proto)
