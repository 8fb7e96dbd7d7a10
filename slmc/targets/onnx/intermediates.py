"""Hidden states of an ONNX flow (slmc diff): the artifact's graph exported again from the same
lowered decoder with the residual stream as one more graph output, `hidden_states`
(compiler/lowering/taps.py), run in onnxruntime on the CPU.

The exported graph's value names come from torch.export's nodes, not from blocks, so the
debug graph names its output instead. `diff` checks its last logits row against the
artifact's own session.
"""

from __future__ import annotations

import numpy as np
import torch

from ...compiler.ir import Model
from ...compiler.lowering import LoweredLM
from ...compiler.lowering.taps import Tapped
from ...errors import SlmcError
from ..base import Intermediates
from .export import OPSET, GenAIDecoder, cache_names, lowering_spec


def hidden_states(model: Model, manifest: dict, ids: list[int]) -> Intermediates:
    import onnxruntime as ort

    T = len(ids)
    lm = LoweredLM(model, lowering_spec()).eval()
    caches = tuple(lm.empty_caches())
    args = (torch.tensor([ids], dtype=torch.int64), torch.arange(T).reshape(1, T), *caches)
    past, present = cache_names(model.n_layers)
    with torch.no_grad():
        ep = torch.export.export(Tapped(GenAIDecoder(lm), lm).eval(), args, strict=False)
        prog = torch.onnx.export(ep, args, dynamo=True, input_names=["input_ids", "position_ids", *past],
                                 output_names=["logits", *present, "hidden_states"], opset_version=OPSET,
                                 optimize=True, verbose=False)
    data = prog.model_proto.SerializeToString()
    del prog, ep, lm
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise SlmcError(f"onnxruntime could not load the debug graph: {e}", "onnx") from None
    feeds = {"input_ids": args[0].numpy(), "position_ids": args[1].numpy(),
             **{n: c.numpy() for n, c in zip(past, caches)}}
    logits, states = sess.run(["logits", "hidden_states"], feeds)
    return Intermediates(states=torch.from_numpy(np.asarray(states, np.float32)),
                         logits=torch.from_numpy(np.asarray(logits, np.float32)).reshape(T, -1),
                         runtime="onnxruntime",
                         how="debug .onnx graph with the hidden states as an extra graph output")
