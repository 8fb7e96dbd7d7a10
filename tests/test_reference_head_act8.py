"""The reference executor applies the head's own int8 dynamic activations (an 8da4w head):
the head is an ordinary linear of the IR, so `act_bits` on it quantizes its input per token,
as every target's lowering does. (It once computed the head with float activations, so a
tiny 8da4w artifact sat KL 2.6e-6 from a reference that was not the scheme it claimed.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmc import api
from slmc.compiler import reference
from slmc.compiler.ir import QuantWeight
from slmc.compiler.quant import fake_quant_tokens

RTN = "quant.rtn:bits=4,group_size=32,scale_dtype=bfloat16,act_bits=8,symmetric=true,head_bits=4,embed_bits=4"


def test_head_int8_activations_apply(tiny_llama_dir):
    ir, _ = api.run_passes(api.load(str(tiny_llama_dir), max_seq_len=48), [RTN])
    assert isinstance(ir.lm_head.weight, QuantWeight) and ir.lm_head.weight.act_bits == 8
    ids = torch.arange(1, 17)[None]
    x = reference.embed(ir, ids)
    for d in range(ir.n_layers):
        x = reference.block(ir.block_at(d), x, torch.arange(16), ir.kv.dtype, ir.kv.ring)
    normed = reference.rms_norm(x, ir.final_norm)
    w = ir.lm_head.weight.float()
    want = F.linear(fake_quant_tokens(normed), w)
    got = reference.forward(ir, ids)
    assert torch.equal(got, want)
    # control: with float activations the head's logits differ, so the comparison can fail
    assert (F.linear(normed, w) - want).abs().max() > 1e-4
