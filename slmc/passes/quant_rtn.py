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

from dataclasses import dataclass

from ..compiler.ir import Linear, Model, QuantWeight
from ..compiler.pass_manager import Pass, PassResult, register
from ..compiler.quant import QuantScheme, rtn
from ..errors import SlmcError
from ._linears import block_linears


@dataclass(frozen=True)
class RTNOptions:
    bits: int = 4
    group_size: int = 32  # 0: one group per output row (per channel)
    symmetric: bool = True
    embed_bits: int = 0  # 0: keep the embedding table in float
    head_bits: int = 0  # 0: keep the output head in float
    scale_dtype: str = "float32"  # bfloat16: scales exact in XNNPACK's bf16 storage
    act_bits: int = 0  # 8: int8 dynamic per-token activations at run time (XNNPACK 8da4w)


def quantize_ends(ir: Model, opts, algorithm: str) -> int:
    """Embedding and head at their own bit widths (shared by every quantization pass)."""
    n = 0
    if opts.head_bits:
        if ir.lm_head is None:
            ir.lm_head = Linear(ir.embed)
        if not isinstance(ir.lm_head.weight, QuantWeight):
            s = QuantScheme(opts.head_bits, opts.group_size, opts.symmetric, opts.scale_dtype)
            s.check(ir.lm_head.in_features, "--pass quant:head_bits")
            ir.lm_head.weight = rtn(ir.lm_head.weight.float(), s, algorithm)
            n += 1
    if opts.embed_bits and not isinstance(ir.embed, QuantWeight):
        s = QuantScheme(opts.embed_bits, opts.group_size, opts.symmetric, opts.scale_dtype)
        s.check(ir.hidden_size, "--pass quant:embed_bits")
        ir.embed = rtn(ir.embed.float(), s, algorithm)
        n += 1
    return n


def set_act_bits(ir: Model, opts, where: str) -> None:
    """Record run-time activation quantization on every quantized block linear and head."""
    if opts.act_bits not in (0, 8):
        raise SlmcError(f"act_bits={opts.act_bits}: 0 (float activations) or 8 (int8 per token)", where)
    if not opts.act_bits:
        return
    lins = [lin for _, lin in block_linears(ir)] + ([ir.lm_head] if ir.lm_head is not None else [])
    for lin in lins:
        if isinstance(lin.weight, QuantWeight):
            lin.weight.act_bits = opts.act_bits


@register
class QuantRTN(Pass):
    name = "quant.rtn"
    Options = RTNOptions

    def run(self, ir: Model) -> PassResult:
        o = self.options
        s = QuantScheme(o.bits, o.group_size, o.symmetric, o.scale_dtype)
        done: dict[int, QuantWeight] = {}
        for path, lin in block_linears(ir):
            if isinstance(lin.weight, QuantWeight):
                continue
            key = id(lin.weight)
            if key not in done:  # a weight shared by several depths is quantized once
                s.check(lin.in_features, f"--pass quant.rtn ({path})")
                done[key] = rtn(lin.weight.float(), s)
            lin.weight = done[key]
        n = len(done) + quantize_ends(ir, o, "rtn")
        set_act_bits(ir, o, "--pass quant.rtn")
        return PassResult(ir, n > 0, {"quantized": n, "scheme": f"{'s' if o.symmetric else 'a'}int{o.bits}g{o.group_size}"})
