"""Lowering for expert offload: the decoder cut into segments a runner calls one by one.

A model whose MoE layers run from separately loaded experts cannot be one forward():
the runner must see each MoE layer's routing before it can fetch that layer's experts.
So the decoder becomes
  embed(tokens[1, T]) -> x[1, T, H]
  layer_d(x, input_pos[1]) -> dense depth:  x'
                           -> MoE depth:    (x + attention [+ gated shared expert], ffn_norm(x),
                                             top_w[1, T, k], top_i[1, T, k])
  head(x[1, H]) -> logits[1, vocab]
  expert(x[N, H]) -> [N, H]   (one module per routed expert)
built from the same components as LoweredLM (a layer segment is an LBlock whose FFN may stop
at the MoE router), so quantized weights and every attention variant lower the same way. Each layer segment holds its own
K/V cache as mutable buffers named k_cache_{d}/v_cache_{d} (unique names, so a program of
all segments can keep every layer's cache in one shared arena).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim, ExportedProgram

from ...errors import UnsupportedError
from ..ir import MLP, Model, MoE
from .attention import AttnContext, LAttention
from .layers import LMLP, _Params, zeros_untouched
from .math import rope_tables, softcap
from .module import LBlock, LoweringSpec
from .quantized import unwrap


def _finish(seg: nn.Module, P: _Params) -> nn.Module:
    return unwrap(seg) if P.quantized else seg


class EmbedSegment(nn.Module):
    def __init__(self, model: Model, spec: LoweringSpec):
        super().__init__()
        P = _Params(self, spec.dtype)
        self.embed, self.scale = P(model.embed), model.embed_scale
        _finish(self, P)

    def forward(self, tokens):
        x = F.embedding(tokens, self.embed)
        return x * self.scale if self.scale != 1.0 else x


class HeadSegment(nn.Module):
    def __init__(self, model: Model, spec: LoweringSpec):
        super().__init__()
        P, C = _Params(self, spec.dtype), spec.components
        self.final_norm = C.norm(model.final_norm, P, C.channels_first)
        self.weight = P(model.lm_head.weight if model.lm_head is not None else model.embed)
        self.bias = P(model.lm_head.bias) if model.lm_head is not None else None
        self.softcap = model.final_logit_softcap
        _finish(self, P)

    def forward(self, x):
        logits = F.linear(self.final_norm(x), self.weight, self.bias)
        return softcap(logits, self.softcap) if self.softcap is not None else logits


class LayerSegment(LBlock):
    """One depth: attention with its own cache, then the dense MLP or the MoE's router.
    Its own constructor keeps the weights in the order the segments were always exported in."""

    def __init__(self, model: Model, depth: int, spec: LoweringSpec):
        nn.Module.__init__(self)
        b, kv = model.block_at(depth), model.kv
        a = b.attn
        if kv.dtype not in ("float32", "float16") or kv.window is not None or kv.arena:
            raise UnsupportedError(f"KV spec dtype={kv.dtype} window={kv.window} arena={kv.arena} is not "
                                   "lowered for expert offload", "kv")
        P, C = _Params(self, spec.dtype), spec.components
        bshd, cf = kv.layout == "bshd", C.channels_first
        norm = lambda n: C.norm(n, P, cf) if n is not None else None  # noqa: E731
        self.attn_norm, self.attn = norm(b.attn_norm), LAttention(a, P, C, bshd)
        self.post_attn, self.ffn_norm, self.post_ffn = norm(b.post_attn_norm), norm(b.ffn_norm), norm(b.post_ffn_norm)
        self.window, self.max_len, self.depth = a.sliding_window, kv.max_len, depth
        cos, sin = rope_tables(a.rope, kv.max_len, a.head_dim)
        self.register_buffer("rope_cos", cos.to(spec.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(spec.dtype), persistent=False)
        shape = (1, kv.max_len, a.n_kv_heads, a.head_dim) if bshd else (1, a.n_kv_heads, kv.max_len, a.head_dim)
        cache_dtype = torch.float16 if kv.dtype == "float16" else spec.dtype  # LAttention rounds into it
        self.register_buffer(f"k_cache_{depth}", zeros_untouched(shape, cache_dtype))
        self.register_buffer(f"v_cache_{depth}", zeros_untouched(shape, cache_dtype))
        f = b.ffn
        self.moe = isinstance(f, MoE)
        if self.moe:
            if b.post_ffn_norm is not None:
                raise UnsupportedError("expert offload of an MoE block with a post-FFN norm "
                                       "(the runner adds expert outputs after this segment)", "lowering")
            self.router, self.top_k, self.norm_topk = C.projection(f.router, P), f.top_k, f.norm_topk_prob
            self.shared = LMLP(f.shared, P, C) if f.shared is not None else None
            self.shared_gate = C.projection(f.shared_gate, P) if f.shared_gate is not None else None
        else:
            self.mlp = LMLP(f, P, C)
        _finish(self, P)

    def forward(self, x, input_pos):
        positions = input_pos + torch.arange(x.shape[1], dtype=torch.int64)
        keys = torch.arange(self.max_len, dtype=torch.int64)
        ok = keys[None, :] <= positions[:, None]
        if self.window is not None:
            ok = ok & (positions[:, None] - keys[None, :] < self.window)
        mask = torch.where(ok, 0.0, float("-inf")).to(x.dtype)
        ctx = AttnContext(self.rope_cos[positions], self.rope_sin[positions], mask, positions=positions)
        kc, vc = getattr(self, f"k_cache_{self.depth}"), getattr(self, f"v_cache_{self.depth}")
        x, _, _ = self.attention(x, ctx, kc, vc)
        if not self.moe:
            return self.feed_forward(x, self.mlp)
        n = self.ffn_norm(x)
        probs = torch.softmax(self.router(n), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        if self.shared is not None:
            s = self.shared(n)
            x = x + (torch.sigmoid(self.shared_gate(n)) * s if self.shared_gate is not None else s)
        return x, n, top_w, top_i


class ExpertSegment(nn.Module):
    def __init__(self, expert: MLP, spec: LoweringSpec):
        super().__init__()
        P = _Params(self, spec.dtype)
        self.mlp = LMLP(expert, P, spec.components)
        _finish(self, P)

    def forward(self, x):
        return self.mlp(x)


def moe_depths(model: Model) -> list[int]:
    return [d for d in range(model.n_layers) if isinstance(model.block_at(d).ffn, MoE)]


def export_segments(model: Model, spec: LoweringSpec = LoweringSpec(), dynamic: bool = True
                    ) -> tuple[dict[str, ExportedProgram], dict[tuple[int, int], ExportedProgram]]:
    """({method name: program} of the backbone, {(depth, expert): program}).

    T (tokens per call) and N (rows per expert call) are dynamic in 1..max_len-1, or 1
    for backends with static shapes (the runner then prefills token by token).
    """
    H, top = model.hidden_size, model.kv.max_len - 1
    T = Dim("seq_len", max=top) if dynamic else None
    n = 2 if dynamic else 1

    def ex(module, args, shapes):
        with torch.no_grad():
            return torch.export.export(module.eval(), args, dynamic_shapes=shapes if dynamic else None,
                                       strict=False)

    x = torch.zeros(1, n, H)
    pos = torch.zeros(1, dtype=torch.int64)
    backbone = {"embed": ex(EmbedSegment(model, spec), (torch.zeros(1, n, dtype=torch.int64),), ({1: T},))}
    for d in range(model.n_layers):
        backbone[f"layer_{d}"] = ex(LayerSegment(model, d, spec), (x, pos), ({1: T}, None))
    backbone["head"] = ex(HeadSegment(model, spec), (torch.zeros(1, H),), None)
    N = Dim("rows", max=top) if dynamic else None
    experts = {}
    for d in moe_depths(model):
        for e, expert in enumerate(model.block_at(d).ffn.experts):
            experts[(d, e)] = ex(ExpertSegment(expert, spec), (torch.zeros(n, H),), ({0: N},))
    return backbone, experts
