"""IR verification. Each check is data: a name, what it guards, and a function that
yields (where, problem) pairs. `verify()` runs them all and reports every problem at
once, so a broken pass or importer is diagnosed in one go."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import SlmcError
from .ir import KV_DTYPES, KV_LAYOUTS, MLP, Attention, Linear, Model, MoE, QuantWeight, Weight

Problem = tuple[str, str]


@dataclass(frozen=True)
class Check:
    name: str
    doc: str
    fn: Callable[[Model], Iterable[Problem]]


def _shape(lin: Linear | None, where: str, out: int, inp: int) -> Iterable[Problem]:
    if lin is None:
        yield where, "missing"
        return
    if tuple(lin.weight.shape) != (out, inp):
        yield where, f"weight shape {list(lin.weight.shape)}, expected [{out}, {inp}]"
    if lin.bias is not None and tuple(lin.bias.shape) != (out,):
        yield where + ".bias", f"shape {list(lin.bias.shape)}, expected [{out}]"


def _check_layers(m: Model):
    if not m.layers:
        yield "layers", "model has no layers"
    for d, b in enumerate(m.layers):
        if not 0 <= b < len(m.blocks):
            yield f"layers.{d}", f"refers to block {b}, but there are {len(m.blocks)} blocks"
    unused = set(range(len(m.blocks))) - set(m.layers)
    if unused:
        yield "blocks", f"blocks {sorted(unused)} are not used at any depth"


def _check_attention(m: Model):
    h = m.hidden_size
    for i, blk in enumerate(m.blocks):
        a: Attention = blk.attn
        w = f"blocks.{i}.attn"
        if a.n_kv_heads <= 0 or a.n_heads % a.n_kv_heads:
            yield w, f"n_heads={a.n_heads} is not a multiple of n_kv_heads={a.n_kv_heads}"
            continue
        q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        if a.fused == (a.q is not None or a.k is not None or a.v is not None):
            yield w, "needs either fused qkv or separate q/k/v, not both or neither"
        elif a.fused:
            yield from _shape(a.qkv, w + ".qkv", q + 2 * kv, h)
        else:
            yield from _shape(a.q, w + ".q", q, h)
            yield from _shape(a.k, w + ".k", kv, h)
            yield from _shape(a.v, w + ".v", kv, h)
        yield from _shape(a.o, w + ".o", h, q)
        for nm in ("q_norm", "k_norm"):
            n = getattr(a, nm)
            if n is not None and tuple(n.weight.shape) != (a.head_dim,):
                yield f"{w}.{nm}", f"shape {list(n.weight.shape)}, expected [{a.head_dim}]"
        if not (0 < a.rope.dim <= a.head_dim) or a.rope.dim % 2:
            yield w + ".rope", f"rotary dim {a.rope.dim} must be even and in 1..{a.head_dim}"
        if a.sliding_window is not None and a.sliding_window <= 0:
            yield w, f"sliding_window {a.sliding_window} must be positive"


def _mlp(mlp: MLP, w: str, h: int) -> Iterable[Problem]:
    if mlp.act not in ("silu", "gelu_tanh", "gelu"):
        yield w, f"unknown activation {mlp.act!r}"
    inter = mlp.down.in_features
    if mlp.fused == (mlp.gate is not None or mlp.up is not None):
        yield w, "needs either fused gate_up or separate gate/up, not both or neither"
    elif mlp.fused:
        yield from _shape(mlp.gate_up, w + ".gate_up", 2 * inter, h)
    else:
        yield from _shape(mlp.gate, w + ".gate", inter, h)
        yield from _shape(mlp.up, w + ".up", inter, h)
    yield from _shape(mlp.down, w + ".down", h, inter)


def _check_ffn(m: Model):
    h = m.hidden_size
    for i, blk in enumerate(m.blocks):
        w = f"blocks.{i}.ffn"
        f = blk.ffn
        if isinstance(f, MLP):
            yield from _mlp(f, w, h)
        elif isinstance(f, MoE):
            yield from _shape(f.router, w + ".router", len(f.experts), h)
            if not 1 <= f.top_k <= len(f.experts):
                yield w, f"top_k={f.top_k} outside 1..{len(f.experts)} experts"
            for e, ex in enumerate(f.experts):
                yield from _mlp(ex, f"{w}.experts.{e}", h)
            if f.shared is not None:
                yield from _mlp(f.shared, w + ".shared", h)
            if f.shared_gate is not None:
                yield from _shape(f.shared_gate, w + ".shared_gate", 1, h)
        else:
            yield w, f"unknown ffn type {type(f).__name__}"


def _check_norms(m: Model):
    def norms():
        yield "final_norm", m.final_norm
        for i, b in enumerate(m.blocks):
            for nm in ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm"):
                if getattr(b, nm) is not None:
                    yield f"blocks.{i}.{nm}", getattr(b, nm)

    for w, n in norms():
        if tuple(n.weight.shape) != (m.hidden_size,):
            yield w, f"shape {list(n.weight.shape)}, expected [{m.hidden_size}]"
        if not n.eps > 0:
            yield w, f"eps {n.eps} must be positive"


def _check_embeddings(m: Model):
    if tuple(m.embed.shape) != (m.vocab_size, m.hidden_size):
        yield "embed", f"shape {list(m.embed.shape)}, expected [{m.vocab_size}, {m.hidden_size}]"
    if m.lm_head is not None:
        yield from _shape(m.lm_head, "lm_head", m.vocab_size, m.hidden_size)
    for t in [m.bos_id, *m.eos_ids]:
        if t is not None and not 0 <= t < m.vocab_size:
            yield "tokens", f"special token id {t} outside vocab of {m.vocab_size}"


def _check_kv(m: Model):
    kv = m.kv
    if kv.layout not in KV_LAYOUTS:
        yield "kv.layout", f"{kv.layout!r} is not one of {KV_LAYOUTS}"
    if kv.dtype not in KV_DTYPES:
        yield "kv.dtype", f"{kv.dtype!r} is not one of {KV_DTYPES}"
    if kv.max_len <= 0:
        yield "kv.max_len", f"{kv.max_len} must be positive"
    if kv.max_len > m.max_position:
        yield "kv.max_len", f"{kv.max_len} exceeds the model's limit of {m.max_position} positions"
    if kv.window is not None and not 0 < kv.window <= kv.max_len:
        yield "kv.window", f"{kv.window} must be in 1..max_len={kv.max_len}"
    if kv.sink_tokens < 0 or (kv.sink_tokens and kv.window is None):
        yield "kv.sink_tokens", "attention sinks need a non-negative count and a window"


def _check_quant(m: Model):
    from .ir import named_weights

    for w, t in named_weights(m):
        if isinstance(t, QuantWeight):
            if t.bits not in (2, 3, 4, 8):
                yield w, f"bit width {t.bits} unsupported"
            if t.codes.dim() != 2 or t.shape[1] % t.group_size:
                yield w, f"group size {t.group_size} does not divide {t.shape[1]}"
                continue
            ng = t.shape[1] // t.group_size
            if tuple(t.scales.shape) != (t.shape[0], ng):
                yield w, f"scales shape {list(t.scales.shape)}, expected [{t.shape[0]}, {ng}]"
            if t.act_bits not in (0, 8):
                yield w, f"activation bits {t.act_bits} unsupported (0: float, 8: int8 per token)"
            if t.symmetric != (t.zeros is None):
                yield w, "symmetric tensors have no zeros; asymmetric ones need them"
            if not bool(t.scales.isfinite().all()):
                yield w, "scales contain NaN or Inf"
        elif isinstance(t, Weight) and t.dtype not in ("float32", "float16", "bfloat16"):
            yield w, f"dense weight dtype {t.dtype} is not a float type"


def _check_scalars(m: Model):
    for nm in ("embed_scale",):
        v = getattr(m, nm)
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            yield nm, f"{v!r} is not a finite number"
    if m.final_logit_softcap is not None and m.final_logit_softcap <= 0:
        yield "final_logit_softcap", "must be positive"


def _check_offload(m: Model):
    # depths pointing at no block are the layers check's finding; skip them here
    depths = [d for d in range(m.n_layers)
              if 0 <= m.layers[d] < len(m.blocks) and isinstance(m.block_at(d).ffn, MoE)]
    plans = [m.block_at(d).ffn.offload for d in depths]
    if all(p is None for p in plans):
        return
    for i, (d, p) in enumerate(zip(depths, plans)):
        w, moe = f"blocks.{m.layers[d]}.ffn.offload", m.block_at(d).ffn
        if p is None:
            yield w, "missing: an offload plan covers every MoE depth or none"
            continue
        if p.cache_experts < moe.top_k:
            yield w, f"cache_experts={p.cache_experts} < top_k={moe.top_k}"
        if len(p.frequencies) != len(moe.experts) or abs(sum(p.frequencies) - 1) > 1e-4:
            yield w, f"frequencies need {len(moe.experts)} entries summing to 1"
        nxt = len(m.block_at(depths[i + 1]).ffn.experts) if i + 1 < len(depths) else None
        t = p.transition
        if (t is None) != (nxt is None):
            yield w, "a transition table belongs to every MoE depth but the last"
        elif t is not None and (len(t) != len(moe.experts) or any(len(r) != nxt for r in t)):
            yield w, f"transition table must be [{len(moe.experts)}, {nxt}]"
        elif t is not None and any(min(r) < 0 or abs(sum(r) - 1) > 1e-4 for r in t):
            yield w, "transition rows must be probabilities summing to 1"


CHECKS: tuple[Check, ...] = (
    Check("layers", "every depth names an existing block; no orphan blocks", _check_layers),
    Check("attention", "head counts, KV groups, projection shapes, rope dims", _check_attention),
    Check("ffn", "MLP and MoE shapes, activations, top_k", _check_ffn),
    Check("norms", "norm weight shapes and eps", _check_norms),
    Check("embeddings", "embedding/lm_head shapes and special-token ids", _check_embeddings),
    Check("kv_cache", "KV-cache spec is self-consistent and within the model's limit", _check_kv),
    Check("quant", "quantized tensors: bits, groups, scales, zeros", _check_quant),
    Check("scalars", "finite model-level scalars", _check_scalars),
    Check("moe_offload", "expert-offload plans: cache size, frequencies, transition tables", _check_offload),
)


def problems(model: Model) -> list[Problem]:
    out: list[Problem] = []
    for c in CHECKS:
        out.extend(c.fn(model))
    return out


def verify(model: Model, context: str = "IR") -> None:
    found = problems(model)
    if found:
        lines = "; ".join(f"{w}: {p}" for w, p in found[:8])
        more = f" (+{len(found) - 8} more)" if len(found) > 8 else ""
        raise SlmcError(f"{context} failed verification: {lines}{more}")
