"""canon.split_projections: the inverse of canon.fuse_projections.

Per-projection passes (quantization with per-matrix statistics, GQA conversion)
and some targets want q/k/v and gate/up as separate matrices.

Before:                                   After (Phi-3 style input):
  attn: ... qkv f32[9216,3072]              attn: ... q f32[3072,3072]
                                              k f32[3072,3072] v f32[3072,3072]
  mlp(silu): gate_up f32[16384,3072] ...    mlp(silu): gate f32[8192,3072] up f32[8192,3072] ...
"""

from __future__ import annotations

from ..compiler.ir import Model
from ..compiler.pass_manager import Pass, PassResult, register
from ._options import ProjectionOptions
from ._walk import attentions, is_dense, mlps, split_linear


@register
class SplitProjections(Pass):
    name = "canon.split_projections"
    Options = ProjectionOptions

    @property
    def ensures(self) -> tuple[str, ...]:
        o = self.options
        return (("split_qkv",) if o.qkv else ()) + (("split_gate_up",) if o.gate_up else ())

    def run(self, ir: Model) -> PassResult:
        n = 0
        if self.options.qkv:
            for a in attentions(ir):
                if a.fused and is_dense(a.qkv):
                    nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
                    a.q, a.k, a.v = split_linear(a.qkv, [nq, nkv, nkv])
                    a.qkv = None
                    n += 1
        if self.options.gate_up:
            for m in mlps(ir):
                if m.fused and is_dense(m.gate_up):
                    inter = m.down.in_features
                    m.gate, m.up = split_linear(m.gate_up, [inter, inter])
                    m.gate_up = None
                    n += 1
        return PassResult(ir, n > 0, {"split": n})
