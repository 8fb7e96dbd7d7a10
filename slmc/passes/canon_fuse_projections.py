"""canon.fuse_projections: one GEMM for q/k/v and one for gate/up.

Fewer, larger matmuls suit CPU/GPU delegates (one XNNPACK call per token instead of three).

Before:                                   After:
  attn: ... q f32[576,576]                  attn: ...
    k f32[192,576] v f32[192,576]             qkv: f32[960,576]
  mlp(silu): gate f32[1536,576]             mlp(silu): gate_up f32[3072,576]
             up f32[1536,576] down ...                 down ...
Quantized projections are left as they are (their groups would need re-deriving).
The fused weights are new floats: they go to scratch space (compiler/spill.py) as they are
made, so the pass leaves the model as lazy as it found it, not two thirds of it on the heap.
"""

from __future__ import annotations

from ..compiler.ir import Model
from ..compiler.pass_manager import Pass, PassResult, register
from ..compiler.spill import Spill, spill_tree
from ._options import ProjectionOptions
from ._walk import attentions, concat_linears, is_dense, mlps


@register
class FuseProjections(Pass):
    name = "canon.fuse_projections"
    Options = ProjectionOptions

    @property
    def ensures(self) -> tuple[str, ...]:
        o = self.options
        return (("fused_qkv",) if o.qkv else ()) + (("fused_gate_up",) if o.gate_up else ())

    def run(self, ir: Model) -> PassResult:
        n, sp = 0, Spill(self.name)
        if self.options.qkv:
            for a in attentions(ir):
                if not a.fused and is_dense(a.q, a.k, a.v):
                    a.qkv, a.q, a.k, a.v = concat_linears([a.q, a.k, a.v]), None, None, None
                    spill_tree(a.qkv, sp)
                    n += 1
        if self.options.gate_up:
            for m in mlps(ir):
                if not m.fused and is_dense(m.gate, m.up):
                    m.gate_up, m.gate, m.up = concat_linears([m.gate, m.up]), None, None
                    spill_tree(m.gate_up, sp)
                    n += 1
        return PassResult(ir, n > 0, {"fused": n, "spilled_mib": round(sp.nbytes / 2**20, 1)})
