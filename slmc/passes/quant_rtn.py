"""quant.rtn: round-to-nearest groupwise weight quantization (int4/int8, sym/asym).

Every block projection becomes a QuantWeight; the reference executor then runs the
exact dequantized weights, so it is the ground truth for quantized artifacts.
Embeddings and the output head keep their float weights unless embed_bits/head_bits
say otherwise (a tied head gets its own node first, so the two can differ).

Before:                                  After (bits=4, group_size=32):
  q: f32[576,576]                          q: sint4g32[576,576](rtn)
  mlp(silu): gate f32[1536,576] ...        mlp(silu): gate sint4g32[1536,576](rtn) ...
  lm_head: tied to embed                   lm_head: tied to embed        (head_bits=0)
"""

from __future__ import annotations

from ..compiler.ir import Model, QuantWeight, block_linears
from ..compiler.pass_manager import PassResult, register
from ..compiler.quant import rtn
from ..compiler.spill import Spill
from ._options import QuantOptions
from ._quant import QuantPass, quantize_ends, set_act_bits, spilled


@register
class QuantRTN(QuantPass):
    name = "quant.rtn"
    Options = QuantOptions

    def run(self, ir: Model) -> PassResult:
        o, s = self.options, self.scheme(ir)
        done: dict[int, QuantWeight] = {}
        # each weight's codes go to scratch space as they are made and its float pages are let
        # go: at 1B the one-code-per-byte tables alone are 1.2 GB (issue 17)
        codes_file = Spill(f"--pass {self.name}")
        for path, lin in block_linears(ir):
            if isinstance(lin.weight, QuantWeight):
                continue
            key = id(lin.weight)
            if key not in done:  # a weight shared by several depths is quantized once
                done[key] = rtn(lin.weight.float(), s)
                spilled(done[key], codes_file)
            lin.weight = done[key]
        n = len(done) + quantize_ends(ir, o, "rtn", spill=codes_file)
        set_act_bits(ir, o, "--pass quant.rtn")
        return PassResult(ir, n > 0, {"quantized": n, "scheme": f"{'s' if o.symmetric else 'a'}int{o.bits}g{o.group_size}"})
