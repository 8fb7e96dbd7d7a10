"""The Core ML decoder module: swift-transformers' I/O (inputIds, causalMask -> start = E - T)
over one stacked KV cache (states keyCache/valueCache, or inputs returned updated)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...compiler.ir import Model
from ...compiler.lowering.module import LMLP, LAttention, LBlock, LNorm, _Params, _rope, head_linear
from ...compiler.lowering.quantized import unwrap
from ...compiler.reference import activation, rope_cos_sin


def act(name: str, x):
    """The MLP activation in plain ops: coremltools 9 drops torch.export's gelu(approximate="tanh")
    keyword and converts it as exact gelu; spelled out, its own pass fuses it back correctly."""
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    return activation(name, x)


class CMLP(LMLP):
    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1) if self.fused else (self.gate(x), self.up(x))
        return self.down(act(self.act, g) * u)


class CNorm(LNorm):
    """RMSNorm that survives fp16: x * x overflows past |x| = 256 (SmolLM2's residual stream
    reaches 2e4), so each row is first divided by its max |x|. The same norm exactly:
    x/s * rsqrt(mean((x/s)^2) + eps/s^2) == x * rsqrt(mean(x^2) + eps) for any s > 0."""

    def forward(self, x):
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-4)
        xs = x / s
        return xs * torch.rsqrt(F.linear(xs * xs, self.mean_row) + self.eps_vec / s / s) * (self.weight + self.offset)


class CAttention(LAttention):
    """Attention over one layer of the stacked cache: writes rows [start, end), reads [0, end)."""

    def forward(self, x, cos, sin, mask, kc, vc, span, inplace, slots=None, pad=None):
        # slots/pad belong to ring caches, which Core ML refuses (supports())
        (start, end), h, kvh, hd = span, self.h, self.kvh, self.hd
        if self.fused:
            q, k, v = self.qkv(x).split([h * hd, kvh * hd, kvh * hd], -1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = q.view(-1, h, hd), k.view(-1, kvh, hd), v.view(-1, kvh, hd)  # [T, heads, hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, cos, sin, self.rot_t), _rope(k, cos, sin, self.rot_t)
        axis = 0 if self.bshd else 1  # cache rows: [L, kvh, hd] or [kvh, L, hd]
        k_new, v_new = (k, v) if self.bshd else (k.transpose(0, 1), v.transpose(0, 1))
        if inplace:  # a state: update in place, Core ML turns it into slice_update + state write
            (kc[:, start:end] if axis else kc[start:end]).copy_(k_new)
            (vc[:, start:end] if axis else vc[start:end]).copy_(v_new)
        else:
            kc = torch.slice_scatter(kc, k_new, axis, start, end)
            vc = torch.slice_scatter(vc, v_new, axis, start, end)
        keys = kc[:, :end] if axis else kc[:end].transpose(0, 1)  # [kvh, E, hd]
        values = vc[:, :end] if axis else vc[:end].transpose(0, 1)
        rep = h // kvh  # fold each group's query heads into rows as (T, rep), T outermost
        qg = q.view(-1, kvh, rep, hd).permute(1, 0, 2, 3).reshape(kvh, -1, hd)
        s = torch.bmm(qg, keys.transpose(1, 2)) * self.scale
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        s = s.view(kvh, -1, rep, s.shape[-1]) + mask[None, :, None, :]
        p = torch.softmax(s, dim=-1).view(kvh, -1, s.shape[-1])
        out = torch.bmm(p, values).view(kvh, -1, rep, hd).permute(1, 0, 2, 3).reshape(1, -1, h * hd)
        return self.o(out), kc, vc


class CBlock(LBlock):
    """LBlock with CAttention; its `positions` argument carries the (start, end) span."""

    def __init__(self, b, P, bshd):
        super().__init__(b, P, bshd)
        self.attn = CAttention(b.attn, P, bshd)


class CoreMLLM(nn.Module):
    """forward(inputIds[1, T] int32, causalMask[1, 1, T, E]) -> logits[1, T, vocab], start = E - T.

    states: the caches are buffers `keyCache`/`valueCache` [layers, kvh, L, hd] (BHSD) or
    [layers, L, kvh, hd] (BSHD); io: they are two more inputs, returned updated after logits.
    """

    def __init__(self, model: Model, stateful: bool, fp16: bool = False):
        super().__init__()
        kv, bshd = model.kv, model.kv.layout == "bshd"
        P = _Params(self, torch.float32)  # Core ML converts fp32 graphs; fp16 is its compute precision
        self.embed, self.embed_scale = P(model.embed), model.embed_scale
        self.blocks = nn.ModuleList(CBlock(b, P, bshd) for b in model.blocks)
        self.layers, self.stateful = list(model.layers), stateful
        self.final_norm = LNorm(model.final_norm, P)
        self.head = head_linear(model, P)
        self.final_softcap = model.final_logit_softcap
        self.fp16 = fp16
        for m in self.modules():  # the shared modules, with the activation and norm above
            if type(m) is LMLP:
                m.__class__ = CMLP
            elif type(m) is LNorm and fp16:
                m.__class__ = CNorm
        ropes, self.windows, self.layer_rope, self.layer_window = [], [], [], []
        for d in range(model.n_layers):
            a = model.block_at(d).attn
            key = (a.rope.theta, a.rope.dim, a.head_dim, repr(a.rope.scaling))
            if key not in ropes:
                cos, sin = rope_cos_sin(a.rope, torch.arange(kv.max_len))
                pad = a.head_dim - a.rope.dim  # partial rotary: identity on the tail
                self.register_buffer(f"rope_cos{len(ropes)}", F.pad(cos, (0, pad), value=1.0), persistent=False)
                self.register_buffer(f"rope_sin{len(ropes)}", F.pad(sin, (0, pad), value=0.0), persistent=False)
                ropes.append(key)
            if a.sliding_window not in self.windows:
                self.windows.append(a.sliding_window)
            self.layer_rope.append(ropes.index(key))
            self.layer_window.append(self.windows.index(a.sliding_window))
        self.n_ropes = len(ropes)
        a = model.block_at(0).attn
        row = (kv.max_len, a.n_kv_heads) if bshd else (a.n_kv_heads, kv.max_len)
        self.cache_shape = (model.n_layers, *row, a.head_dim)
        if stateful:  # fp32 here; the converter declares the states fp16 (Core ML has no other)
            self.register_buffer("keyCache", torch.zeros(self.cache_shape))
            self.register_buffer("valueCache", torch.zeros(self.cache_shape))
        if P.quantized:  # torchao Intx weights -> dequantize_affine -> constexpr_blockwise_shift_scale
            unwrap(self)

    def forward(self, input_ids, causal_mask, key_cache=None, value_cache=None):
        T, end = input_ids.shape[1], causal_mask.shape[-1]
        start = end - T
        x = F.embedding(input_ids, self.embed)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        pos = torch.arange(T) + start
        ok = torch.arange(end)[None, :] <= pos[:, None]
        masks = []
        for w in self.windows:
            allowed = ok if w is None else torch.logical_and(ok, pos[:, None] - torch.arange(end)[None, :] < w)
            masks.append(torch.where(allowed, 0.0, float("-inf")) + causal_mask[0, 0])
        ropes = [(getattr(self, f"rope_cos{i}")[start:end, None, :], getattr(self, f"rope_sin{i}")[start:end, None, :])
                 for i in range(self.n_ropes)]
        kcs, vcs = (self.keyCache, self.valueCache) if self.stateful else (key_cache, value_cache)
        new_k, new_v = [], []
        for d, b in enumerate(self.layers):  # states: layer views written in place; io: updated copies
            cos, sin = ropes[self.layer_rope[d]]
            x, kc, vc = self.blocks[b](x, cos, sin, masks[self.layer_window[d]], kcs[d], vcs[d], (start, end),
                                       self.stateful)
            new_k.append(kc)
            new_v.append(vc)
        logits = self.head(self.final_norm(x))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits if self.stateful else (logits, torch.stack(new_k), torch.stack(new_v))
