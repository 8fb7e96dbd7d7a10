"""What one token costs: the bytes it reads and the operations it performs, from the shapes
and the storage schemes alone (no weights needed).

Conventions (multiply-add = 2 operations):
- decode reads every weight of the active path once (all layers' linears at their stored bits
  plus scales, norms and biases in float, the output head), one embedding row, and the KV
  cache of every layer up to the current position; it writes one KV row per layer;
- prefill of T tokens from position 0 reads the weights once and computes the head for the
  last position only (what slmc's artifacts and the ExecuTorch/LiteRT runners do);
- attention costs 4 * heads * head_dim operations per attended position (QK^T and AV);
- a mixture-of-experts layer reads and computes top_k experts (+ the shared one) per decode
  token; prefill reads min(experts, T * top_k) of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    """How a weight matrix is stored: float at `bits` (16, 32), or integer codes in groups of
    `group_size` along the input (0: one group per output row) with one scale each (and one
    zero point each when asymmetric), both `scale_bytes` wide."""

    bits: int
    group_size: int = 0
    scale_bytes: int = 4
    zero_points: bool = False
    act_bits: int = 0  # 8: int8 dynamic activations, so the matmul runs in int8

    @property
    def is_float(self) -> bool:
        return self.bits >= 16

    def bytes(self, rows: int, cols: int) -> float:
        if self.is_float:
            return rows * cols * self.bits / 8
        groups = rows * (-(-cols // self.group_size) if self.group_size else 1)
        return rows * cols * self.bits / 8 + groups * self.scale_bytes * (2 if self.zero_points else 1)

    def describe(self) -> str:
        if self.is_float:
            return f"fp{self.bits}"
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        act = f", int{self.act_bits} activations" if self.act_bits else ""
        return f"int{self.bits} {g} ({self.scale_bytes}-byte scales{', zero points' if self.zero_points else ''}{act})"


@dataclass(frozen=True)
class Storage:
    linear: Scheme  # the transformer blocks' projections
    embed: Scheme
    head: Scheme
    float_bits: int  # norms, biases, activations
    kv_bits: int  # 32, 16 or 8 (int8: plus a float32 scale per token and KV head)


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False
    windows: tuple = ()  # per layer: sliding window or None (empty: no sliding layers)
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_expert: int = 0
    sparse: tuple = ()  # per layer: MoE ffn or not (empty: every layer when experts > 0)
    max_position: int = 0

    def is_sparse(self, layer: int) -> bool:
        return self.experts > 0 and (not self.sparse or bool(self.sparse[layer]))

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None


def _attn_mats(s: Shape) -> list[tuple[int, int]]:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return [(q, s.hidden), (kv, s.hidden), (kv, s.hidden), (s.hidden, q)]


def _mlp(rows: int, hidden: int) -> list[tuple[int, int]]:
    return [(rows, hidden), (rows, hidden), (hidden, rows)]  # gate, up, down


def layer_mats(s: Shape, layer: int, experts_used: float) -> list[tuple[int, int, float]]:
    """(rows, cols, how many copies are touched) of each matrix of one layer; experts_used:
    how many routed experts a step touches (all of them for the resident weights)."""
    out = [(r, c, 1.0) for r, c in _attn_mats(s)]
    if s.is_sparse(layer):
        out.append((s.experts, s.hidden, 1.0))  # router
        out += [(r, c, experts_used) for r, c in _mlp(s.expert_intermediate, s.hidden)]
        if s.shared_expert:
            out += [(r, c, 1.0) for r, c in _mlp(s.shared_expert, s.hidden)] + [(1, s.hidden, 1.0)]
    else:
        out += [(r, c, 1.0) for r, c in _mlp(s.intermediate, s.hidden)]
    return out


def layer_float_params(s: Shape) -> int:
    """Norm scales and biases of one layer (kept in float by every target)."""
    n = s.hidden * (4 if s.sandwich_norms else 2) + (2 * s.head_dim if s.qk_norm else 0)
    n += (s.heads + 2 * s.kv_heads) * s.head_dim if s.qkv_bias else 0
    return n + (s.hidden if s.o_bias else 0)


def _mats(s: Shape, experts_used) -> list[tuple[int, int, float]]:
    return [m for i in range(s.layers) for m in layer_mats(s, i, experts_used(i))]


def linear_macs(s: Shape) -> float:
    """Multiply-adds of the blocks' projections for one token (top_k routed experts)."""
    return sum(r * c * k for r, c, k in _mats(s, lambda i: s.top_k))


def block_weight_bytes(s: Shape, st: Storage, experts_used) -> float:
    """Bytes of the blocks' weights touched (linears at their scheme, norms/biases in float)."""
    mats = sum(st.linear.bytes(r, c) * k for r, c, k in _mats(s, experts_used))
    return mats + s.layers * layer_float_params(s) * st.float_bits / 8 + s.hidden * st.float_bits / 8


def weight_bytes(s: Shape, st: Storage) -> float:
    """Resident weight bytes: every block, every expert, the embedding table and the head (a
    tied head shares the table when both are stored alike)."""
    table = st.embed.bytes(s.vocab, s.hidden)
    head = 0.0 if s.tied and st.head == st.embed else st.head.bytes(s.vocab, s.hidden)
    return block_weight_bytes(s, st, lambda i: s.experts) + table + head


def kv_row_bytes(s: Shape, st: Storage) -> float:
    """K and V of one position in one layer (int8: + a float32 scale per KV head each)."""
    per = 2 * s.kv_heads * s.head_dim * st.kv_bits / 8
    return per + (2 * s.kv_heads * 4 if st.kv_bits == 8 else 0)


def attended(s: Shape, layer: int, ctx: int, ring: int | None) -> int:
    """Positions a token at context length ctx attends to in this layer."""
    w = s.window(layer)
    for lim in (w, ring):
        if lim:
            ctx = min(ctx, lim)
    return ctx


def decode_cost(s: Shape, st: Storage, pos: int, ring: int | None = None) -> dict:
    """Bytes and operations of the decode step of the token at position `pos` (0-based)."""
    ctx = [attended(s, i, pos + 1, ring) for i in range(s.layers)]
    kv_read = sum(ctx) * kv_row_bytes(s, st)
    weights = block_weight_bytes(s, st, lambda i: s.top_k) + st.head.bytes(s.vocab, s.hidden)
    embed_row = st.embed.bytes(1, s.hidden)
    ops = 2 * linear_macs(s) + 2 * s.vocab * s.hidden + 4 * s.heads * s.head_dim * sum(ctx)
    return {"weight_bytes": weights, "embed_row_bytes": embed_row, "kv_read_bytes": kv_read,
            "kv_write_bytes": s.layers * kv_row_bytes(s, st),
            "bytes": weights + embed_row + kv_read + s.layers * kv_row_bytes(s, st), "ops": ops}


def prefill_cost(s: Shape, st: Storage, tokens: int, ring: int | None = None) -> dict:
    """Bytes and operations of prefilling `tokens` tokens from position 0."""
    used = min(s.experts, tokens * s.top_k)
    weights = block_weight_bytes(s, st, lambda i: used) + st.head.bytes(s.vocab, s.hidden)
    attn = sum(attended(s, i, t + 1, ring) for i in range(s.layers) for t in range(tokens))
    kv = s.layers * tokens * kv_row_bytes(s, st)
    ops = 2 * linear_macs(s) * tokens + 2 * s.vocab * s.hidden + 4 * s.heads * s.head_dim * attn
    return {"bytes": weights + tokens * st.embed.bytes(1, s.hidden) + 2 * kv, "ops": ops}


def memory(s: Shape, st: Storage, max_len: int, prefill_tokens: int, ring: int | None = None) -> dict:
    """Peak bytes besides the runtime's own: weights, the KV cache at max_len, and the largest
    activations (a prefill chunk's hidden states and MLP intermediates, one layer's attention
    scores over the cache, the logits)."""
    slots = sum(attended(s, i, max_len, ring) for i in range(s.layers))
    f = st.float_bits / 8
    width = max(s.intermediate, s.expert_intermediate * max(s.top_k, 1), s.shared_expert)
    acts = prefill_tokens * (4 * s.hidden + 2 * width + (s.heads + 2 * s.kv_heads) * s.head_dim) * f
    scores = prefill_tokens * s.heads * min(max_len, ring or max_len) * f
    return {"weights": weight_bytes(s, st), "kv_cache": slots * kv_row_bytes(s, st),
            "activations": acts + scores + s.vocab * 4}
