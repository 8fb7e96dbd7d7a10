"""Attention: one module, one forward; the core (head layout, cache writer, attend) is a component.

forward: project q/k/v -> split heads (core) -> q/k norms -> RoPE (component) -> core.attend,
which writes the new rows into the cache, attends and projects out. Cores:
  RowCacheAttention   per-layer caches [1, kvh, L, hd] / [1, L, kvh, hd]: index_copy, a target's
                      write_rows op, or ring-buffer slots; fp32/fp16/int8 (ExecuTorch, LiteRT);
                      batched_einsum: rank-4 matmuls over the cache as stored (LiteRT);
                      values_by_column: V caches [1, kvh, hd, L] (LiteRT, ExecuTorch/XNNPACK)
  StackedCacheAttention  one layer of Core ML's keyCache/valueCache, rows [start, end)
  PerHeadAttention    the same cache, channels-first heads, one small matmul per head (ANE)
Batch 1 throughout (the LLM-runner convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..ir import Attention
from .cache import as_stored, read_rows, write_rows, write_span
from .layers import _Params
from .math import rotate_half_matrix, softcap


@dataclass
class AttnContext:
    """What one depth's attention needs besides its input and caches."""

    cos: torch.Tensor  # RoPE rows of the new tokens, shaped for the core's head layout
    sin: torch.Tensor
    mask: torch.Tensor  # additive, over the keys the core attends to
    inplace: bool = True  # caches are buffers/states (True) or inputs returned updated (False)
    positions: torch.Tensor | None = None  # row caches: each new row's position
    span: tuple | None = None  # stacked caches: the new rows are [start, end)
    slots: torch.Tensor | None = None  # ring cache: each new row's slot (ring.py)
    pad: torch.Tensor | None = None  # rows that are padding (LiteRT-LM), which must not overwrite a ring


class LAttention(nn.Module):
    def __init__(self, a: Attention, P: _Params, C, bshd: bool = False, v_columns: bool = False):
        super().__init__()
        proj = C.projection
        self.h, self.kvh, self.hd, self.bshd = a.n_heads, a.n_kv_heads, a.head_dim, bshd
        self.v_columns = v_columns  # the V cache is [1, kvh, hd, L] (RowCacheAttention.columns)
        self.core, self.rope, self.axis = C.attention, C.rope, 1 if proj.channels_first else -1
        self.fused = a.fused
        if a.fused:
            self.qkv = proj(a.qkv, P)
        else:
            self.q, self.k, self.v = proj(a.q, P), proj(a.k, P), proj(a.v, P)
        self.o = proj(a.o, P)
        head_norm = lambda n: C.norm(n, P, proj.channels_first) if n is not None else None  # noqa: E731
        self.q_norm, self.k_norm = head_norm(a.q_norm), head_norm(a.k_norm)
        self.scale, self.softcap = a.scale, a.logit_softcap
        self.rope_dim = a.rope.dim
        # F.linear(x, W) computes x @ W.T, so store R.T
        self.register_buffer("rot_t", rotate_half_matrix(a.head_dim, a.rope.dim, P.dtype).T.contiguous(),
                             persistent=False)

    def forward(self, x, ctx: AttnContext, k_cache, v_cache):
        h, kvh, hd = self.h, self.kvh, self.hd
        if self.fused:
            q, k, v = self.qkv(x).split([h * hd, kvh * hd, kvh * hd], self.axis)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = self.core.heads(self, q, k, v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, ctx.cos, ctx.sin, self), self.rope(k, ctx.cos, ctx.sin, self)
        return self.core.attend(self, q, k, v, ctx, k_cache, v_cache)

    def scores(self, q, keys):
        s = torch.bmm(q, keys.transpose(1, 2)) * self.scale
        return softcap(s, self.softcap) if self.softcap is not None else s


@dataclass(frozen=True)
class RowCacheAttention:
    """Per-layer caches. write_rows(cache, axis, positions[T], rows) -> cache: a target's op for
    the T new rows, out of place (LiteRT: dynamic_update_slice at positions[0]; ONNX: a scatter
    along the cache's axis); None: index_copy at every row's position. Ring caches always use
    index_copy."""

    write_rows: Callable | None = None
    # attend over BHSD caches as stored, by rank-4 einsums: LiteRT lowers each to one
    # BATCH_MATMUL on the cache, where the rank-3 bmm form copies the whole cache through a
    # RESHAPE per matmul per step (60 cache copies a decode step on SmolLM2-135M)
    batched_einsum: bool = False
    # V caches stored [1, kvh, hd, L], keys on the last axis, as litert-torch stores them:
    # XNNPACK packs a BATCH_MATMUL's dynamic right operand on every call, and packs p @ V's
    # [hd, L] with a vectorized packer but [L, hd] with a scalar loop (perf: 9 % of a decode
    # step on SmolLM2-135M at 512 rows). The rank-3 form reads them as bmm(p, V.transpose(1, 2)),
    # which ExecuTorch's XNNPACK lowering writes as one transposed-operand bmm (bmm_operands.py).
    values_by_column: bool = False
    stacked, channels_first = False, False  # the cache form and hidden layout it works on

    def columns(self, kv) -> bool:
        """Whether V caches under this KV spec are stored by column: linear BHSD float caches
        (ring, BSHD and int8 caches keep rows)."""
        return self.values_by_column and kv.layout == "bhsd" and kv.ring is None and kv.dtype != "int8"

    def heads(self, a: LAttention, q, k, v):
        # Every reshape names the dynamic length as -1 and everything else statically: XNNPACK
        # takes such views, while symbolic sizes would split the graph into many small delegates.
        return (q.reshape(1, -1, a.h, a.hd).transpose(1, 2), k.reshape(1, -1, a.kvh, a.hd).transpose(1, 2),
                v.reshape(1, -1, a.kvh, a.hd).transpose(1, 2))

    def attend(self, a: LAttention, q, k, v, ctx: AttnContext, k_cache, v_cache):
        # BHSD caches take [1, kvh, T, hd] rows on axis 2; BSHD caches [1, T, kvh, hd] on axis 1.
        # contiguous(): index_copy on a transposed source makes export guard on T.
        axis = 1 if a.bshd else 2
        k_new = (k.transpose(1, 2) if a.bshd else k).contiguous()
        v_new = (v.transpose(1, 2) if a.bshd else v).contiguous()
        if ctx.slots is not None:  # ring: attend to [old slots | new rows], then write (ring.py)
            parts = [(read_rows(k_cache), read_rows(v_cache)),
                     (as_stored(k_new, k_cache), as_stored(v_new, v_cache))]
            out = self._attend(a, q, parts, ctx.mask)
            return (out, write_rows(k_cache, axis, ctx.slots, k_new, ctx.inplace, ctx.pad),
                    write_rows(v_cache, axis, ctx.slots, v_new, ctx.inplace, ctx.pad))
        k_cache = write_rows(k_cache, axis, ctx.positions, k_new, ctx.inplace, writer=self.write_rows)
        if a.v_columns:  # [1, kvh, hd, T] columns on axis 3
            v_cache = write_rows(v_cache, 3, ctx.positions, v.transpose(2, 3).contiguous(), ctx.inplace,
                                 writer=self.write_rows)
        else:
            v_cache = write_rows(v_cache, axis, ctx.positions, v_new, ctx.inplace, writer=self.write_rows)
        return self._attend(a, q, [(read_rows(k_cache), read_rows(v_cache))], ctx.mask), k_cache, v_cache

    @staticmethod
    def _heads(a: LAttention, rows, dtype):
        """Cache-layout rows -> [kvh, L, hd]."""
        if a.bshd:
            return rows.reshape(-1, a.kvh, a.hd).transpose(0, 1).to(dtype)
        return rows.reshape(a.kvh, -1, a.hd).to(dtype)

    def _attend(self, a: LAttention, q, parts, mask):
        """Attention over the (K, V) row sets in `parts`, as one key sequence under `mask`.
        Scores are computed per part and joined only on their last axis: one concatenated
        key sequence of length W + T would make export guard on sums it cannot prove."""
        h, kvh, hd = a.h, a.kvh, a.hd
        # Grouped attention without repeating the cache: fold each KV group's query
        # heads into the row axis as (T, rep), T outermost (a symbolic axis split with
        # T innermost makes torch.export add unprovable guards).
        rep = h // kvh
        if self.batched_einsum and len(parts) == 1 and not a.bshd:
            return self._attend_einsum(a, q, parts[0], mask)
        qg = q.reshape(kvh, rep, -1, hd).transpose(1, 2).reshape(kvh, -1, hd)
        scores, values = [], []
        for k_rows, v_rows in parts:
            keys = self._heads(a, k_rows, q.dtype)
            # V by column: [kvh, hd, L], read as its transpose (one part: linear caches only)
            vals = v_rows.reshape(kvh, hd, -1).to(q.dtype).transpose(1, 2) if a.v_columns \
                else self._heads(a, v_rows, q.dtype)
            scores.append(a.scores(qg, keys).view(kvh, -1, rep, keys.shape[1]))
            values.append(vals)
        s = (scores[0] if len(scores) == 1 else torch.cat(scores, -1)) + mask[:, None, :]
        p = torch.softmax(s, dim=-1)
        out, at = None, 0
        for vals in values:
            L = vals.shape[1]
            pi = p if len(values) == 1 else p[..., at:at + L]
            o = torch.bmm(pi.reshape(kvh, -1, L), vals)
            out, at = (o if out is None else out + o), at + L
        out = out.view(kvh, -1, rep, hd)
        return a.o(out.permute(1, 0, 2, 3).reshape(1, -1, h * hd))

    @staticmethod
    def _attend_einsum(a: LAttention, q, part, mask):
        """_attend's math on one BHSD row set [1, kvh, L, hd] (V [1, kvh, hd, L] when
        a.v_columns), the batch axes kept."""
        h, kvh, hd = a.h, a.kvh, a.hd
        rep = h // kvh
        keys, vals = part[0].to(q.dtype), part[1].to(q.dtype)
        qg = q.reshape(1, kvh, rep, -1, hd).transpose(2, 3).reshape(1, kvh, -1, hd)
        s = torch.einsum("bgth,bgsh->bgts", qg, keys) * a.scale
        s = softcap(s, a.softcap) if a.softcap is not None else s
        L = keys.shape[2]
        p = torch.softmax(s.view(1, kvh, -1, rep, L) + mask[:, None, :], dim=-1)
        out = torch.einsum("bgts,bghs->bgth" if a.v_columns else "bgts,bgsh->bgth", p.reshape(1, kvh, -1, L),
                           vals).view(1, kvh, -1, rep, hd)
        return a.o(out.permute(0, 2, 1, 3, 4).reshape(1, -1, h * hd))


@dataclass(frozen=True)
class StackedCacheAttention:
    """One layer of a stacked cache (Core ML): heads [T, heads, hd], rows [start, end) written,
    [0, end) attended to; mask [T, end]."""

    stacked, channels_first = True, False

    def heads(self, a: LAttention, q, k, v):
        return q.view(-1, a.h, a.hd), k.view(-1, a.kvh, a.hd), v.view(-1, a.kvh, a.hd)

    def attend(self, a: LAttention, q, k, v, ctx: AttnContext, kc, vc):
        h, kvh, hd = a.h, a.kvh, a.hd
        k_new, v_new = (k, v) if a.bshd else (k.transpose(0, 1), v.transpose(0, 1))
        kc, vc, keys, values = write_span(kc, vc, k_new, v_new, ctx.span, ctx.inplace, a.bshd)
        rep = h // kvh  # fold each group's query heads into rows as (T, rep), T outermost
        qg = q.view(-1, kvh, rep, hd).permute(1, 0, 2, 3).reshape(kvh, -1, hd)
        s = a.scores(qg, keys)
        s = s.view(kvh, -1, rep, s.shape[-1]) + ctx.mask[None, :, None, :]
        p = torch.softmax(s, dim=-1).view(kvh, -1, s.shape[-1])
        out = torch.bmm(p, values).view(kvh, -1, rep, hd).permute(1, 0, 2, 3).reshape(1, -1, h * hd)
        return a.o(out), kc, vc


@dataclass(frozen=True)
class PerHeadAttention:
    """The stacked cache in the Neural Engine layout: heads channels-first [heads, hd, T], one
    [E, hd] x [hd, T] matmul per head (keys on the leading axis, softmax over axis 0), no
    tensor above rank 4; mask [E, T]."""

    stacked, channels_first = True, True

    def heads(self, a: LAttention, q, k, v):
        return q.view(a.h, a.hd, -1), k.view(a.kvh, a.hd, -1), v.view(a.kvh, a.hd, -1)

    def attend(self, a: LAttention, q, k, v, ctx: AttnContext, kc, vc):
        h, kvh, hd = a.h, a.kvh, a.hd
        # cache rows are [kvh, L, hd] (BHSD) or [L, kvh, hd] (BSHD), as in the standard layout
        k_new = k.permute(2, 0, 1) if a.bshd else k.transpose(1, 2)
        v_new = v.permute(2, 0, 1) if a.bshd else v.transpose(1, 2)
        kc, vc, keys, values = write_span(kc, vc, k_new, v_new, ctx.span, ctx.inplace, a.bshd)
        rep, outs = h // kvh, []
        for i in range(h):  # split heads: small rank-2 matmuls the Neural Engine maps well
            g = i // rep
            s = torch.matmul(keys[g], q[i]) * a.scale  # [E, T]
            if a.softcap is not None:
                s = softcap(s, a.softcap)
            p = torch.softmax(s + ctx.mask, dim=0)
            outs.append(torch.matmul(values[g].transpose(0, 1), p))  # [hd, T]
        out = torch.cat(outs, dim=0).view(1, h * hd, 1, -1)
        return a.o(out), kc, vc
