"""canon.untie_embeddings: give the output head its own node (same tensor, stored once).

Lets later passes treat lm_head separately (e.g. quantize it at another bit width)
without changing what the model computes.

Before:                      After:
  embed: f32[49152,576]        embed: f32[49152,576]
  lm_head: tied to embed       lm_head: f32[49152,576]   (the same Weight object)
"""

from __future__ import annotations

from ..compiler.ir import Linear, Model
from ..compiler.pass_manager import Pass, PassResult, register


@register
class UntieEmbeddings(Pass):
    name = "canon.untie_embeddings"
    ensures = ("untied_head",)

    def run(self, ir: Model) -> PassResult:
        if ir.lm_head is not None:
            return PassResult(ir, False)
        ir.lm_head = Linear(ir.embed)
        return PassResult(ir, True)
