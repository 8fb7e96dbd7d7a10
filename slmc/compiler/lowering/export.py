"""torch.export of the lowered decoder, shared by every target."""

from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from ..ir import Model
from ..spill import page_out_weights
from .module import LoweredLM, LoweringSpec


def max_chunk(model: Model) -> int:
    """The most tokens one forward call takes: max_len - 1, and no more than a ring-buffer
    cache's non-sink slots (a chunk's rows must land in distinct slots)."""
    kv = model.kv
    if kv.window is not None:
        return min(kv.max_len - 1, kv.window - kv.sink_tokens)
    return kv.max_len - 1


def example_inputs(model: Model, T: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, T, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)


def export_decoder(model: Model, spec: LoweringSpec = LoweringSpec(), dynamic: bool = True) -> ExportedProgram:
    """Export forward(tokens[1, T], input_pos[1]); T is dynamic in 1..max_chunk(model)."""
    module = LoweredLM(model, spec).eval()
    page_out_weights()  # the heap copies the module's mapped weights replaced go back to the system
    if dynamic:
        # max_len - 1: a Dim whose max equals a static size it is compared against
        # gets specialised by export (ExecuTorch's own LLM export does the same).
        shapes = ({1: Dim("seq_len", max=max_chunk(model))}, None)
        args = example_inputs(model, 2)
    else:
        shapes, args = None, example_inputs(model, 1)
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)


def drop_last_trace() -> None:
    """Let the last traced graph go. torch's make_fx tracer keeps every node of its latest trace
    in a module global (proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT, read by export's
    fake-tensor leak check right after that trace) until the next trace replaces it; through a
    node, the whole graph, its fake tensors and their FakeTensorMode stay alive (a 4189-node
    graph while LiteRT runs its MLIR passes on SmolLM2-135M)."""
    from torch.fx.experimental import proxy_tensor

    held = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(held, dict):
        held.clear()


def io_spec(model: Model, spec: LoweringSpec, dynamic: bool = True) -> dict:
    """The method signature, as recorded in every manifest."""
    seq = f"1..{max_chunk(model)}" if dynamic else "1"
    logits = [1, seq, model.vocab_size] if spec.full_logits else [1, model.vocab_size]
    return {
        "inputs": [
            {"name": "tokens", "dtype": "int64", "shape": [1, seq]},
            {"name": "input_pos", "dtype": "int64", "shape": [1],
             "meaning": "position of tokens[0, 0] in the KV cache"},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": logits,
                     "meaning": "all positions" if spec.full_logits else "last position only"}],
    }
