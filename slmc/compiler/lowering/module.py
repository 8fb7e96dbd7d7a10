"""Lowering: IR -> an export-friendly torch module built from plain ops.

Every target starts here. The module follows ExecuTorch's LLM-runner convention,
`forward(tokens[1, T], input_pos[1]) -> logits`, with the KV cache held as mutable
buffers (one K and one V per depth, even where depths share a block's weights).
Only ops every runtime has are used: no fused rms_norm, no SDPA custom ops, no
data-dependent shapes (`input_pos` is a tensor, never `.item()`).

Shared IR weights become one shared Parameter, so every exporter stores them once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import UnsupportedError
from ..ir import MLP, Attention, Block, Linear, Model, MoE, Norm, QuantWeight
from ..reference import activation, kv_int8_codes, kv_int8_scale, rope_cos_sin
from .quantized import intx_parameter, unwrap
from .ring import ring_masks, ring_slots


@dataclass(frozen=True)
class LoweringSpec:
    full_logits: bool = False  # False: logits of the last position only, [1, vocab]
    # "buffers": the cache lives in the module as mutable buffers (ExecuTorch, Core ML states);
    # "io": caches are extra inputs and the updated caches extra outputs (LiteRT, Core ML iOS 17).
    kv: str = "buffers"
    # "start": input_pos[1] holds the position of tokens[0, 0] (ExecuTorch runner);
    # "tokens": input_pos[T] holds every token's position (LiteRT-LM).
    positions: str = "start"
    # True: an additive float mask[1, 1, T, max_len] is an input (LiteRT-LM), else built inside.
    mask_input: bool = False
    # True: input_pos[T] as LiteRT-LM fills a padded prefill chunk, 0 past the real tokens;
    # positions stay input_pos[0] + i, and a ring-buffer cache keeps its rows under padding.
    padded: bool = False
    dtype: torch.dtype = torch.float32
    # A target's op for writing T contiguous cache rows at a start position, out of place:
    # write_rows(cache, axis, start[1], rows) -> cache (LiteRT: dynamic_update_slice). None:
    # index_copy at every row's position. Ring caches always use index_copy.
    write_rows: object = None
    # rotate_half as slices and a concat instead of a [head_dim, head_dim] matmul: cheaper
    # where the runtime has no delegate to keep whole (LiteRT); XNNPACK wants the matmul.
    rope_slices: bool = False
    # True: each QuantWeight becomes its exact dequantized float (a plain constant) for a
    # target that puts the codes back itself (LiteRT: targets/tflite/codes.py).
    dequantize: bool = False


class _Params:
    """Turns IR weights into Parameters, one per IR object (shared blocks stay shared)."""

    def __init__(self, owner: nn.Module, dtype: torch.dtype, dequantize: bool = False):
        self.owner, self.dtype, self.memo, self.quantized = owner, dtype, {}, False
        self.dequantize = dequantize

    def __call__(self, w) -> nn.Parameter:
        if w is None:
            return None
        if id(w) not in self.memo and isinstance(w, QuantWeight) and not self.dequantize:
            # not also registered on the owner: unwrap_tensor_subclass would parametrize the
            # same tensor twice in one module, which export then counts as two inputs
            self.quantized = True
            self.memo[id(w)] = intx_parameter(w, self.dtype)
        if id(w) not in self.memo:
            was_loaded = getattr(w, "loaded", True)
            p = nn.Parameter(w.float().to(self.dtype), requires_grad=False)
            if not was_loaded and p.data_ptr() != w.data.data_ptr():
                w.release()  # a converted copy exists now; don't also keep the checkpoint's bf16/fp16
            self.owner.register_parameter(f"w{len(self.memo)}", p)
            self.memo[id(w)] = p
        return self.memo[id(w)]


class LLinear(nn.Module):
    def __init__(self, lin: Linear, P: _Params):
        super().__init__()
        self.weight, self.bias = P(lin.weight), P(lin.bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def head_linear(model: Model, P: _Params) -> LLinear:
    """The output head as a child module, also when tied: a quantized table that the top
    module read twice would be parametrized twice by unwrap_tensor_subclass (two export inputs)."""
    return LLinear(model.lm_head if model.lm_head is not None else Linear(model.embed), P)


class LNorm(nn.Module):
    def __init__(self, n: Norm, P: _Params):
        super().__init__()
        self.weight, self.eps, self.offset = P(n.weight), n.eps, 1.0 if n.unit_offset else 0.0

        d = n.weight.shape[0]
        self.register_buffer("mean_row", torch.full((1, d), 1.0 / d, dtype=P.dtype), persistent=False)
        # eps as a [1] tensor, not a scalar: coremltools fuses "linear + constant" into the
        # linear's bias and fails on a 0-d constant.
        self.register_buffer("eps_vec", torch.full((1,), n.eps, dtype=P.dtype), persistent=False)

    def forward(self, x):
        # Plain ops on purpose (Core ML rejects aten.rms_norm), and the mean of squares
        # as a 1-row linear: XNNPACK delegates linear but not mean.dim, and every
        # undelegated op splits the graph into another delegate call.
        ms = F.linear(x * x, self.mean_row)
        return x * torch.rsqrt(ms + self.eps_vec) * (self.weight + self.offset)


class LMLP(nn.Module):
    def __init__(self, m: MLP, P: _Params):
        super().__init__()
        self.act = m.act
        self.fused = m.fused
        if m.fused:
            self.gate_up = LLinear(m.gate_up, P)
        else:
            self.gate, self.up = LLinear(m.gate, P), LLinear(m.up, P)
        self.down = LLinear(m.down, P)

    def forward(self, x):
        if self.fused:
            g, u = self.gate_up(x).chunk(2, dim=-1)
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(activation(self.act, g) * u)


class LMoE(nn.Module):
    """Dense-compute MoE: every expert runs, weights are zero off the top-k.

    Static shapes and no data-dependent control flow, so it exports everywhere;
    sparse execution is the job of the expert-offload pass and its runner.
    """

    def __init__(self, m: MoE, P: _Params):
        super().__init__()
        self.router = LLinear(m.router, P)
        self.experts = nn.ModuleList(LMLP(e, P) for e in m.experts)
        self.top_k, self.norm = m.top_k, m.norm_topk_prob
        self.shared = LMLP(m.shared, P) if m.shared is not None else None
        self.shared_gate = LLinear(m.shared_gate, P) if m.shared_gate is not None else None

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        if self.norm:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        n = len(self.experts)
        weights = (F.one_hot(top_i, n).to(x.dtype) * top_w.unsqueeze(-1)).sum(-2)  # [.., n]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * weights[..., e:e + 1]
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            out = out + s
        return out


class LAttention(nn.Module):
    def __init__(self, a: Attention, P: _Params, bshd: bool = False):
        super().__init__()
        self.h, self.kvh, self.hd, self.bshd = a.n_heads, a.n_kv_heads, a.head_dim, bshd
        self.fused = a.fused
        if a.fused:
            self.qkv = LLinear(a.qkv, P)
        else:
            self.q, self.k, self.v = LLinear(a.q, P), LLinear(a.k, P), LLinear(a.v, P)
        self.o = LLinear(a.o, P)
        self.q_norm = LNorm(a.q_norm, P) if a.q_norm is not None else None
        self.k_norm = LNorm(a.k_norm, P) if a.k_norm is not None else None
        self.scale, self.softcap = a.scale, a.logit_softcap
        self.write_rows, self.rope_slices = None, False  # from the LoweringSpec, set by LoweredLM
        self.rope_dim = a.rope.dim
        # F.linear(x, W) computes x @ W.T, so store R.T
        self.register_buffer("rot_t", rotate_half_matrix(a.head_dim, a.rope.dim, P.dtype).T.contiguous(),
                             persistent=False)

    def forward(self, x, cos, sin, mask, k_cache, v_cache, positions, inplace: bool = True, slots=None,
                pad=None):
        # slots: a ring-buffer cache's slot per new row (ring.py); None: the slot is the position.
        # pad: rows that are padding (LiteRT-LM), which must not overwrite a ring's live slots.
        # Batch 1 (the LLM-runner convention). Every reshape names the dynamic
        # length as -1 and everything else statically: XNNPACK takes such views,
        # while symbolic sizes would split the graph into many small delegates.
        h, kvh, hd = self.h, self.kvh, self.hd
        if self.fused:
            q, k, v = self.qkv(x).split([h * hd, kvh * hd, kvh * hd], -1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.reshape(1, -1, h, hd).transpose(1, 2)
        k = k.reshape(1, -1, kvh, hd).transpose(1, 2)
        v = v.reshape(1, -1, kvh, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_slices:
            q, k = _rope_sliced(q, cos, sin, self.rope_dim), _rope_sliced(k, cos, sin, self.rope_dim)
        else:
            q, k = _rope(q, cos, sin, self.rot_t), _rope(k, cos, sin, self.rot_t)
        # BHSD caches take [1, kvh, T, hd] rows on axis 2; BSHD caches [1, T, kvh, hd] on axis 1.
        # contiguous(): index_copy on a transposed source makes export guard on T.
        axis = 1 if self.bshd else 2
        k_new = (k.transpose(1, 2) if self.bshd else k).contiguous()
        v_new = (v.transpose(1, 2) if self.bshd else v).contiguous()
        if slots is not None:  # ring: attend to [old slots | new rows], then write (ring.py)
            parts = [(_read(k_cache), _read(v_cache)), (_as_stored(k_new, k_cache), _as_stored(v_new, v_cache))]
            out = self._attend(q, parts, mask)
            return (out, _write(k_cache, axis, slots, k_new, inplace, pad),
                    _write(v_cache, axis, slots, v_new, inplace, pad))
        k_cache = _write(k_cache, axis, positions, k_new, inplace, writer=self.write_rows)
        v_cache = _write(v_cache, axis, positions, v_new, inplace, writer=self.write_rows)
        return self._attend(q, [(_read(k_cache), _read(v_cache))], mask), k_cache, v_cache

    def _heads(self, rows, dtype):
        """Cache-layout rows -> [kvh, L, hd]."""
        if self.bshd:
            return rows.reshape(-1, self.kvh, self.hd).transpose(0, 1).to(dtype)
        return rows.reshape(self.kvh, -1, self.hd).to(dtype)

    def _attend(self, q, parts, mask):
        """Attention over the (K, V) row sets in `parts`, as one key sequence under `mask`.
        Scores are computed per part and joined only on their last axis: one concatenated
        key sequence of length W + T would make export guard on sums it cannot prove."""
        h, kvh, hd = self.h, self.kvh, self.hd
        # Grouped attention without repeating the cache: fold each KV group's query
        # heads into the row axis as (T, rep), T outermost (a symbolic axis split with
        # T innermost makes torch.export add unprovable guards).
        rep = h // kvh
        qg = q.reshape(kvh, rep, -1, hd).transpose(1, 2).reshape(kvh, -1, hd)
        scores, values = [], []
        for k_rows, v_rows in parts:
            keys, vals = self._heads(k_rows, q.dtype), self._heads(v_rows, q.dtype)
            s = torch.bmm(qg, keys.transpose(1, 2)) * self.scale
            if self.softcap is not None:
                s = torch.tanh(s / self.softcap) * self.softcap
            scores.append(s.view(kvh, -1, rep, keys.shape[1]))
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
        return self.o(out.permute(1, 0, 2, 3).reshape(1, -1, h * hd))


def _write(cache, axis: int, slots, new, inplace: bool, pad=None, writer=None):
    """Store the new rows at `slots`: int8 as codes + per-token scales (the reference's formula),
    float caches rounded to their dtype. Rows where `pad` is true write back what was there.
    writer: a target's op for rows that are contiguous from slots[0] (linear caches)."""
    if isinstance(cache, tuple):
        return _write_int8(cache, axis, slots, new, inplace, pad, writer)
    new = _keep(cache, axis, slots, new.to(cache.dtype), pad)  # fp16 caches round here
    return _store(cache, axis, slots, new, inplace, writer)


def _store(buf, axis: int, slots, rows, inplace: bool, writer=None):
    if inplace:
        buf.index_copy_(axis, slots, rows)
        return buf
    if writer is not None:
        return writer(buf, axis, slots[:1], rows)
    return buf.index_copy(axis, slots, rows)


def _as_stored(new, cache):
    """The new rows as the cache will hand them back once written."""
    if isinstance(cache, tuple):
        s = kv_int8_scale(new)
        return kv_int8_codes(new, s) * s
    return new.to(cache.dtype)


def _scale_shape(cache_shape: tuple) -> tuple:
    return (*cache_shape[:-1], 1)


def _keep(cache, axis: int, slots, rows, pad):
    if pad is None:
        return rows
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    # LiteRT has no fp16 gather: gather in fp32 (exact both ways)
    src = cache.float() if cache.dtype == torch.float16 else cache
    return torch.where(pad.view(shape), src.index_select(axis, slots).to(rows.dtype), rows)


def _write_int8(cache: tuple, axis: int, positions, new, inplace: bool, pad=None, writer=None) -> tuple:
    """Quantize the new rows per token and head, then store codes and scales at `positions`."""
    codes, scales = cache
    s = kv_int8_scale(new)
    q = kv_int8_codes(new, s).to(torch.int8)
    q, s = _keep(codes, axis, positions, q, pad), _keep(scales, axis, positions, s, pad)
    out = (_store(codes, axis, positions, q, inplace, writer), _store(scales, axis, positions, s, inplace, writer))
    return cache if inplace else out


def _read(cache):
    """The cache as float rows: int8 codes times their scales, or the float cache itself."""
    if isinstance(cache, tuple):
        return cache[0].to(cache[1].dtype) * cache[1]
    return cache


def rotate_half_matrix(head_dim: int, rot_dim: int, dtype) -> torch.Tensor:
    """R with x @ R == rotate_half(x) on the first rot_dim dims (zero elsewhere).

    RoPE as x * cos + (x @ R) * sin has no slices or concats of dynamic-length
    tensors, so XNNPACK takes it whole instead of splitting the graph around it.
    """
    R = torch.zeros(head_dim, head_dim, dtype=dtype)
    half = rot_dim // 2
    idx = torch.arange(half)
    R[idx + half, idx] = -1.0
    R[idx, idx + half] = 1.0
    return R


def _rope(x, cos, sin, rot_t):
    return x * cos + F.linear(x, rot_t) * sin


def _rope_sliced(x, cos, sin, rot_dim: int):
    """The same rotation with rotate_half as slices; the tail past rot_dim meets sin = 0."""
    h = rot_dim // 2
    parts = [-x[..., h:rot_dim], x[..., :h]] + ([x[..., rot_dim:]] if rot_dim < x.shape[-1] else [])
    return x * cos + torch.cat(parts, -1) * sin


class LBlock(nn.Module):
    def __init__(self, b: Block, P: _Params, bshd: bool = False):
        super().__init__()
        self.attn_norm, self.attn = LNorm(b.attn_norm, P), LAttention(b.attn, P, bshd)
        self.ffn_norm = LNorm(b.ffn_norm, P)
        self.ffn = LMLP(b.ffn, P) if isinstance(b.ffn, MLP) else LMoE(b.ffn, P)
        self.post_attn = LNorm(b.post_attn_norm, P) if b.post_attn_norm is not None else None
        self.post_ffn = LNorm(b.post_ffn_norm, P) if b.post_ffn_norm is not None else None

    def forward(self, x, cos, sin, mask, kc, vc, positions, inplace: bool = True, slots=None, pad=None):
        h, kc, vc = self.attn(self.attn_norm(x), cos, sin, mask, kc, vc, positions, inplace, slots, pad)
        if self.post_attn is not None:
            h = self.post_attn(h)
        x = x + h
        h = self.ffn(self.ffn_norm(x))
        if self.post_ffn is not None:
            h = self.post_ffn(h)
        return x + h, kc, vc


class LoweredLM(nn.Module):
    """kv="buffers": forward(tokens[1, T] int64, input_pos[1] int64) -> logits.
    kv="io": forward(tokens, input_pos, k_0, v_0, k_1, ...) -> (logits, k_0', v_0', ...)."""

    def __init__(self, model: Model, spec: LoweringSpec = LoweringSpec()):
        super().__init__()
        kv = model.kv
        if kv.dtype not in ("float32", "float16", "int8") or kv.arena:
            raise UnsupportedError(
                f"this lowering holds a fp32/fp16/int8 cache per layer; KV spec dtype={kv.dtype} "
                f"arena={kv.arena} is not lowered yet", "kv")
        # ring buffer: (window, sinks); the cache has `window` slots (ring.py)
        self.ring = kv.ring
        if self.ring and spec.mask_input:
            raise UnsupportedError("a ring-buffer cache builds its own mask; mask_input is for linear caches", "kv")
        slots = kv.window if self.ring else kv.max_len
        bshd = kv.layout == "bshd"
        self.spec, self.max_len = spec, kv.max_len
        self.cache_dtype = {"float16": torch.float16, "int8": torch.int8}.get(kv.dtype, spec.dtype)
        self.int8 = kv.dtype == "int8"  # each cache is (codes, scales per token and head)
        P = _Params(self, spec.dtype, spec.dequantize)
        self.embed = P(model.embed)
        self.embed_scale = model.embed_scale
        self.blocks = nn.ModuleList(LBlock(b, P, bshd) for b in model.blocks)
        for blk in self.blocks:
            blk.attn.write_rows, blk.attn.rope_slices = spec.write_rows, spec.rope_slices
        self.layers = list(model.layers)
        self.final_norm = LNorm(model.final_norm, P)
        self.head = head_linear(model, P)
        self.final_softcap = model.final_logit_softcap
        # One rope table per distinct rope config, one mask per distinct window.
        rope_keys, self.windows, self.layer_rope, self.layer_window = [], [], [], []
        for d in range(model.n_layers):
            a = model.block_at(d).attn
            key = (a.rope.theta, a.rope.dim, a.head_dim, repr(a.rope.scaling))
            if key not in rope_keys:
                cos, sin = rope_cos_sin(a.rope, torch.arange(kv.max_len))
                pad = a.head_dim - a.rope.dim  # partial rotary: identity on the tail
                cos = F.pad(cos, (0, pad), value=1.0)
                sin = F.pad(sin, (0, pad), value=0.0)
                self.register_buffer(f"rope_cos{len(rope_keys)}", cos.to(spec.dtype), persistent=False)
                self.register_buffer(f"rope_sin{len(rope_keys)}", sin.to(spec.dtype), persistent=False)
                rope_keys.append(key)
            if a.sliding_window not in self.windows:
                self.windows.append(a.sliding_window)
            self.layer_rope.append(rope_keys.index(key))
            self.layer_window.append(self.windows.index(a.sliding_window))
        self.n_ropes = len(rope_keys)
        if spec.kv not in ("buffers", "io"):
            raise ValueError(f"LoweringSpec.kv must be 'buffers' or 'io', not {spec.kv!r}")
        if spec.positions not in ("start", "tokens"):
            raise ValueError(f"LoweringSpec.positions must be 'start' or 'tokens', not {spec.positions!r}")
        self.cache_shapes = []
        for d in range(model.n_layers):
            a = model.block_at(d).attn
            self.cache_shapes.append((1, slots, a.n_kv_heads, a.head_dim) if bshd
                                     else (1, a.n_kv_heads, slots, a.head_dim))
        if spec.kv == "buffers":
            for d, shape in enumerate(self.cache_shapes):
                for kv_name in ("k", "v"):
                    self.register_buffer(f"{kv_name}_cache_{d}", torch.zeros(shape, dtype=self.cache_dtype))
                    if self.int8:
                        self.register_buffer(f"{kv_name}_cache_scale_{d}", torch.zeros(_scale_shape(shape),
                                                                                      dtype=spec.dtype))
        if P.quantized:
            unwrap(self)

    def empty_caches(self) -> list[torch.Tensor]:
        """Zero K and V tensors per depth, in forward's argument order (kv="io"); an int8
        cache is two tensors (codes, then scales)."""
        out = []
        for s in self.cache_shapes:
            for _ in (0, 1):
                out.append(torch.zeros(s, dtype=self.cache_dtype))
                if self.int8:
                    out.append(torch.zeros(_scale_shape(s), dtype=self.spec.dtype))
        return out

    def _cache(self, caches, d: int, i: int):
        """Depth d's K (i=0) or V (i=1) cache: a tensor, or (codes, scales) when int8."""
        if self.spec.kv == "io":
            n = 2 if self.int8 else 1
            j = (2 * d + i) * n
            return (caches[j], caches[j + 1]) if self.int8 else caches[j]
        name = f"{'kv'[i]}_cache_{d}"
        return (getattr(self, name), getattr(self, f"{'kv'[i]}_cache_scale_{d}")) if self.int8 \
            else getattr(self, name)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *rest: torch.Tensor):
        T = tokens.shape[1]
        pad = None
        if self.spec.padded:
            pad = (torch.arange(T, dtype=torch.int64) > 0) & (input_pos == 0)
            input_pos = input_pos[:1]
        if self.spec.positions == "tokens":
            positions = input_pos
        else:
            positions = input_pos + torch.arange(T, dtype=torch.int64)
        mask_in, caches = (rest[0], rest[1:]) if self.spec.mask_input else (None, rest)
        x = F.embedding(tokens, self.embed)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        keys = torch.arange(self.max_len, dtype=torch.int64)
        masks, slots = [], None
        if self.ring:
            slots = ring_slots(positions, *self.ring)
            masks = ring_masks(positions, *self.ring, self.windows, x.dtype)
        for w in self.windows if mask_in is None and not self.ring else ():
            ok = keys[None, :] <= positions[:, None]
            if w is not None:
                ok = ok & (positions[:, None] - keys[None, :] < w)
            masks.append(torch.where(ok, 0.0, float("-inf")).to(x.dtype))
        ropes = [(getattr(self, f"rope_cos{i}")[positions], getattr(self, f"rope_sin{i}")[positions])
                 for i in range(self.n_ropes)]
        io, updated = self.spec.kv == "io", []
        for d, b in enumerate(self.layers):
            cos, sin = ropes[self.layer_rope[d]]
            kc, vc = self._cache(caches, d, 0), self._cache(caches, d, 1)
            mask = masks[self.layer_window[d]] if mask_in is None else mask_in[0, 0]
            x, kc, vc = self.blocks[b](x, cos, sin, mask, kc, vc, positions, not io, slots, pad)
            updated += [*kc, *vc] if self.int8 else [kc, vc]
        if not self.spec.full_logits:
            x = x[:, -1, :]
        logits = self.head(self.final_norm(x))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return (logits, *updated) if io else logits

    def reset_cache(self) -> None:
        for name, buf in self.named_buffers():
            if "_cache_" in name:
                buf.zero_()
