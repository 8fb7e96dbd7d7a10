"""Hidden states of a .tflite flow (slmc diff): a debug model of the same lowered decoder (LiteRT's
components, dequantized constants with slmc's codes put back by codes.py) with one signature,
`debug`, that takes the whole prompt and also returns the residual stream
(compiler/lowering/taps.py), run in LiteRT's interpreter.

Why not `experimental_preserve_all_tensors`: it keeps tensors only outside delegates, and the
XNNPACK delegate LiteRT applies by default (the one running the int8-activation GEMMs) would be
switched off, so the numbers would come from other kernels. The debug model runs the same ones;
`diff` checks its last logits row against the artifact's own prefill + decode.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ...compiler.ir import Model
from ...compiler.lowering import LoweredLM
from ...compiler.lowering.taps import Tapped
from ...errors import SlmcError
from ..base import Intermediates
from .codes import store_codes
from .session import _interpreter_class


class _Debug(nn.Module):
    def __init__(self, lm: LoweredLM, names: list[str]):
        super().__init__()
        self.lm, self.names = lm, names

    def forward(self, tokens, input_pos, kv_cache):
        pos = input_pos if self.lm.spec.padded else input_pos[:1]
        out = self.lm(tokens.long(), pos.long(), *[kv_cache[n] for n in self.names])
        return {"logits": out[0]}


HOW = "debug .tflite (one signature over the prompt) with the hidden states as an extra output"


def debug_model(model: Model, ids: list[int], lm: LoweredLM, names: list[str], converting) -> bytes:
    """The debug .tflite's bytes (signature `debug`, static T = len(ids), slmc's codes stored).
    lm: the target's LoweredLM (its components, kv="io", full logits); names: its cache names
    in forward's order; converting(): the context the target converts in (target.py).
    `slmc validate --by-block --on` runs these bytes on a device."""
    import litert_torch

    T = len(ids)
    kv = dict(zip(names, lm.empty_caches()))
    sample = {"tokens": torch.zeros(1, T, dtype=torch.int32), "input_pos": torch.arange(T, dtype=torch.int32),
              "kv_cache": kv}
    with converting(), torch.no_grad():
        module = Tapped(_Debug(lm, names), lm).eval()
        data = bytes(litert_torch.signature("debug", module, sample_kwargs=sample).convert().model_content())
    del lm, module
    data, _ = store_codes(data, model)
    return data


def hidden_states(model: Model, ids: list[int], lm: LoweredLM, names: list[str], converting) -> Intermediates:
    data = debug_model(model, ids, lm, names, converting)
    T = len(ids)
    try:
        runner = _interpreter_class()(model_content=data).get_signature_runner("debug")
    except Exception as e:  # the interpreter raises bare ValueErrors/RuntimeErrors
        raise SlmcError(f"LiteRT could not load the debug model: {e}", "tflite") from None
    caches = {f"kv_cache_{n}": np.zeros(d["shape"], d["dtype"]) for n, d in
              ((n[len("kv_cache_"):], d) for n, d in runner.get_input_details().items() if n.startswith("kv_cache_"))}
    out = runner(tokens=np.array([ids], dtype=np.int32), input_pos=np.arange(T, dtype=np.int32), **caches)
    logits = torch.from_numpy(np.array(out["logits"])).reshape(T, -1).float()
    states = torch.from_numpy(np.array(out["hidden_states"])).float()
    return Intermediates(states=states, logits=logits, runtime="ai_edge_litert", how=HOW)
