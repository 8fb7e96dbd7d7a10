"""The reference executor: runs the IR in plain torch, fp32, full sequence, no cache.

This is the ground truth every artifact is compared with. It is deliberately the
simplest correct reading of the IR (explicit masks, explicit softmax, quantized
tensors dequantized exactly), independent of the export-oriented lowering.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ir import MLP, Attention, Block, Linear, Model, MoE, Norm, QuantWeight, RoPE
from .quant import fake_quant_tokens


def rope_inv_freq(rope: RoPE) -> torch.Tensor:
    inv = 1.0 / (rope.theta ** (torch.arange(0, rope.dim, 2, dtype=torch.float64) / rope.dim))
    s = rope.scaling or {}
    kind = s.get("rope_type", "default")
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(is_mid, mid, scaled)
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} has no reference implementation")
    return inv.float()


def rope_cos_sin(rope: RoPE, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, rope.dim] for the rotate-half convention."""
    freqs = positions.float()[:, None] * rope_inv_freq(rope)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, head_dim]; rotates the first cos.shape[-1] dims."""
    d = cos.shape[-1]
    xr, xp = x[..., :d], x[..., d:]
    x1, x2 = xr[..., : d // 2], xr[..., d // 2:]
    rot = torch.cat([-x2, x1], dim=-1)
    return torch.cat([xr * cos + rot * sin, xp], dim=-1)


def rms_norm(x: torch.Tensor, n: Norm) -> torch.Tensor:
    w = n.weight.float()
    if n.unit_offset:
        w = w + 1.0
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n.eps) * w


def linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    b = lin.bias.float() if lin.bias is not None else None
    w = lin.weight
    if getattr(w, "act_bits", 0):
        x = fake_quant_tokens(x)
    return _matmul(x, w, b)


def _matmul(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    return _rows_linear(x, w, b) if isinstance(w, QuantWeight) and w.numel() > BIG else F.linear(x, w.float(), b)


BIG = 1 << 26  # a quantized weight this large (a 128k-vocabulary head) is dequantized in row chunks


def _rows_linear(x: torch.Tensor, w: QuantWeight, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear over chunks of output rows, so no fp32 copy of the whole weight is ever made."""
    out = x.new_empty(*x.shape[:-1], w.shape[0])
    step = max(1, BIG // 16 // w.shape[1])
    for r in range(0, w.shape[0], step):
        out[..., r:r + step] = F.linear(x, w.rows(slice(r, r + step)), b[r:r + step] if b is not None else None)
    return out


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.gelu(x)


def qkv(a: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if a.fused:
        nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        return linear(x, a.qkv).split([nq, nkv, nkv], dim=-1)
    return linear(x, a.q), linear(x, a.k), linear(x, a.v)


def gate_up(m: MLP, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if m.fused:
        return linear(x, m.gate_up).chunk(2, dim=-1)
    return linear(x, m.gate), linear(x, m.up)


def causal_mask(positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where query i may attend key j."""
    qi, kj = positions[:, None], positions[None, :]
    ok = kj <= qi
    if window is not None:
        ok = ok & (qi - kj < window)
    return ok


def ring_keep(q: torch.Tensor, k: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """A ring-buffer KV cache of `window` slots, `sinks` of them attention sinks: query position
    q sees key position k when k is a sink or among the last window - sinks positions."""
    return (k < sinks) | (q - k < window - sinks)


def kv_int8_scale(x: torch.Tensor) -> torch.Tensor:
    """The int8 KV cache's scale per token and KV head: symmetric over head_dim (the last axis)."""
    return (x.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-10)


def kv_int8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x / scale).clamp(-127, 127)


def kv_int8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    s = kv_int8_scale(x)
    return kv_int8_codes(x, s) * s


def attention(a: Attention, x: torch.Tensor, positions: torch.Tensor, kv_dtype: str = "float32",
              ring: tuple[int, int] | None = None) -> torch.Tensor:
    """ring: (window, sinks) of a ring-buffer KV cache, which hides older keys (ring_keep)."""
    B, T, _ = x.shape
    q, k, v = qkv(a, x)
    q = q.view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
    k = k.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    v = v.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    if a.q_norm is not None:
        q = rms_norm(q, a.q_norm)
    if a.k_norm is not None:
        k = rms_norm(k, a.k_norm)
    cos, sin = rope_cos_sin(a.rope, positions)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv_dtype == "float16":  # what a half-precision KV cache hands back (the current token too)
        k, v = k.half().float(), v.half().float()
    elif kv_dtype == "int8":  # what an int8 cache with per-token scales hands back
        k, v = kv_int8_roundtrip(k), kv_int8_roundtrip(v)
    rep = a.n_heads // a.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * a.scale
    if a.logit_softcap is not None:
        scores = torch.tanh(scores / a.logit_softcap) * a.logit_softcap
    ok = causal_mask(positions, a.sliding_window)
    if ring is not None:
        ok = ok & ring_keep(positions[:, None], positions[None, :], *ring)
    scores = scores.masked_fill(~ok, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return linear(out.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim), a.o)


def mlp(m: MLP, x: torch.Tensor) -> torch.Tensor:
    g, u = gate_up(m, x)
    return linear(activation(m.act, g) * u, m.down)


def moe(m: MoE, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    probs = torch.softmax(linear(x, m.router), dim=-1)
    top_w, top_i = probs.topk(m.top_k, dim=-1)
    if m.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e, expert in enumerate(m.experts):
        rows, slot = (top_i == e).nonzero(as_tuple=True)
        if rows.numel():
            out.index_add_(0, rows, mlp(expert, x[rows]) * top_w[rows, slot, None])
    if m.shared is not None:
        s = mlp(m.shared, x)
        if m.shared_gate is not None:
            s = torch.sigmoid(linear(x, m.shared_gate)) * s
        out = out + s
    return out.reshape(shape)


def block(b: Block, x: torch.Tensor, positions: torch.Tensor, kv_dtype: str = "float32",
          ring: tuple[int, int] | None = None) -> torch.Tensor:
    h = attention(b.attn, rms_norm(x, b.attn_norm), positions, kv_dtype, ring)
    if b.post_attn_norm is not None:
        h = rms_norm(h, b.post_attn_norm)
    x = x + h
    n = rms_norm(x, b.ffn_norm)
    h = mlp(b.ffn, n) if isinstance(b.ffn, MLP) else moe(b.ffn, n)
    if b.post_ffn_norm is not None:
        h = rms_norm(h, b.post_ffn_norm)
    return x + h


def embed(model: Model, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model.embed, QuantWeight):  # only the rows looked up are dequantized
        used, where = torch.unique(ids, return_inverse=True)
        return F.embedding(where, model.embed.rows(used)) * model.embed_scale
    return F.embedding(ids, model.embed.data).float() * model.embed_scale  # no fp32 copy of a bf16 table


def head(model: Model, x: torch.Tensor) -> torch.Tensor:
    x = rms_norm(x, model.final_norm)
    # an own head node is an ordinary linear: its int8 activations (8da4w head) and bias apply
    # a tied head reads the table with float activations
    logits = linear(x, model.lm_head) if model.lm_head is not None else _matmul(x, model.embed)
    if model.final_logit_softcap is not None:
        c = model.final_logit_softcap
        logits = torch.tanh(logits / c) * c
    return logits


@torch.no_grad()
def _nudged(x: torch.Tensor, perturb: float) -> torch.Tensor:
    """x with relative noise `perturb` (fixed seed): the noise floor's nudge of the embeddings."""
    if not perturb:
        return x
    g = torch.Generator().manual_seed(0)
    return x * (1 + perturb * torch.randn(x.shape, generator=g))


def forward(model: Model, ids: torch.Tensor, perturb: float = 0.0) -> torch.Tensor:
    """ids: [B, T] int64 -> logits [B, T, vocab], positions 0..T-1.
    perturb: relative noise (fixed seed) on the embeddings, to measure how far float rounding
    alone moves the logits (validation's noise floor for dynamically quantized activations)."""
    if ids.dim() == 1:
        ids = ids[None]
    positions = torch.arange(ids.shape[1])
    x = embed(model, ids)
    x = _nudged(x, perturb)
    for d in range(model.n_layers):
        x = block(model.block_at(d), x, positions, model.kv.dtype, model.kv.ring)
    return head(model, x)


@torch.no_grad()
def hidden_states(model: Model, ids: list[int], perturb: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream of a prompt at positions 0..T-1: ([depths + 2, T, hidden], logits
    [T, vocab]); rows are the embedding output, the state after every depth, the final norm's
    output (before the head). What `slmc diff` compares each runtime's debug variant with.
    perturb: the embeddings' relative nudge of `forward` (the diff's noise floor)."""
    x = embed(model, torch.tensor([ids]))
    x = _nudged(x, perturb)
    positions = torch.arange(len(ids))
    states = [x[0]]
    for d in range(model.n_layers):
        x = block(model.block_at(d), x, positions, model.kv.dtype, model.kv.ring)
        states.append(x[0])
    states.append(rms_norm(x, model.final_norm)[0])
    return torch.stack(states), head(model, x)[0]


@torch.no_grad()
def greedy(model: Model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation of `prompt` by n tokens; also returns each step's logits."""
    ids, steps = list(prompt), []
    for _ in range(n):
        logits = forward(model, torch.tensor([ids]))[0, -1]
        steps.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], steps
