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
built from the same pieces as LoweredLM (LNorm, LAttention, LMLP, _Params), so quantized
weights and every attention variant lower the same way. Each layer segment holds its own
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
from ..reference import rope_cos_sin
from .module import LAttention, LLinear, LMLP, LNorm, LoweringSpec, _Params
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
        P = _Params(self, spec.dtype)
        self.final_norm = LNorm(model.final_norm, P)
        self.weight = P(model.lm_head.weight if model.lm_head is not None else model.embed)
        self.bias = P(model.lm_head.bias) if model.lm_head is not None else None
        self.softcap = model.final_logit_softcap
        _finish(self, P)

    def forward(self, x):
        logits = F.linear(self.final_norm(x), self.weight, self.bias)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class LayerSegment(nn.Module):
    """One depth: attention with its own cache, then the dense MLP or the MoE's router."""

    def __init__(self, model: Model, depth: int, spec: LoweringSpec):
        super().__init__()
        b, kv = model.block_at(depth), model.kv
        a = b.attn
        if kv.dtype not in ("float32", "float16") or kv.window is not None or kv.arena:
            raise UnsupportedError(f"KV spec dtype={kv.dtype} window={kv.window} arena={kv.arena} is not "
                                   "lowered for expert offload", "kv")
        P = _Params(self, spec.dtype)
        bshd = kv.layout == "bshd"
        self.attn_norm, self.attn = LNorm(b.attn_norm, P), LAttention(a, P, bshd)
        self.post_attn = LNorm(b.post_attn_norm, P) if b.post_attn_norm is not None else None
        self.ffn_norm = LNorm(b.ffn_norm, P)
        self.post_ffn = LNorm(b.post_ffn_norm, P) if b.post_ffn_norm is not None else None
        self.window, self.max_len, self.depth = a.sliding_window, kv.max_len, depth
        cos, sin = rope_cos_sin(a.rope, torch.arange(kv.max_len))
        pad = a.head_dim - a.rope.dim  # partial rotary: identity on the tail
        self.register_buffer("rope_cos", F.pad(cos, (0, pad), value=1.0).to(spec.dtype), persistent=False)
        self.register_buffer("rope_sin", F.pad(sin, (0, pad), value=0.0).to(spec.dtype), persistent=False)
        shape = (1, kv.max_len, a.n_kv_heads, a.head_dim) if bshd else (1, a.n_kv_heads, kv.max_len, a.head_dim)
        cache_dtype = torch.float16 if kv.dtype == "float16" else spec.dtype  # LAttention rounds into it
        self.register_buffer(f"k_cache_{depth}", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer(f"v_cache_{depth}", torch.zeros(shape, dtype=cache_dtype))
        f = b.ffn
        self.moe = isinstance(f, MoE)
        if self.moe:
            if b.post_ffn_norm is not None:
                raise UnsupportedError("expert offload of an MoE block with a post-FFN norm "
                                       "(the runner adds expert outputs after this segment)", "lowering")
            self.router, self.top_k, self.norm_topk = LLinear(f.router, P), f.top_k, f.norm_topk_prob
            self.shared = LMLP(f.shared, P) if f.shared is not None else None
            self.shared_gate = LLinear(f.shared_gate, P) if f.shared_gate is not None else None
        else:
            self.mlp = LMLP(f, P)
        _finish(self, P)

    def forward(self, x, input_pos):
        positions = input_pos + torch.arange(x.shape[1], dtype=torch.int64)
        keys = torch.arange(self.max_len, dtype=torch.int64)
        ok = keys[None, :] <= positions[:, None]
        if self.window is not None:
            ok = ok & (positions[:, None] - keys[None, :] < self.window)
        mask = torch.where(ok, 0.0, float("-inf")).to(x.dtype)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        kc, vc = getattr(self, f"k_cache_{self.depth}"), getattr(self, f"v_cache_{self.depth}")
        h, _, _ = self.attn(self.attn_norm(x), cos, sin, mask, kc, vc, positions)
        if self.post_attn is not None:
            h = self.post_attn(h)
        x = x + h
        n = self.ffn_norm(x)
        if not self.moe:
            h = self.mlp(n)
            return x + (self.post_ffn(h) if self.post_ffn is not None else h)
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
        self.mlp = LMLP(expert, P)
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
