"""canon.tie_embeddings: drop an output head that equals the embedding table.

Saves vocab x hidden weights in every artifact when a checkpoint stored the tied
head twice. Only exact equality ties; anything else is left alone.

Before:                                  After:
  embed: f32[49152,576]                    embed: f32[49152,576]
  lm_head: f32[49152,576] (== embed)       lm_head: tied to embed
"""

from __future__ import annotations

import torch

from ..compiler.ir import Model, Weight
from ..compiler.pass_manager import Pass, PassResult, register


@register
class TieEmbeddings(Pass):
    name = "canon.tie_embeddings"

    def run(self, ir: Model) -> PassResult:
        h = ir.lm_head
        if h is None or h.bias is not None:
            return PassResult(ir, False)
        same = h.weight is ir.embed or (
            isinstance(h.weight, Weight) and isinstance(ir.embed, Weight)
            and h.weight.shape == ir.embed.shape and torch.equal(h.weight.data, ir.embed.data))
        if not same:
            return PassResult(ir, False)
        ir.lm_head = None
        return PassResult(ir, True)
