"""The Neural Engine layout of the Core ML target (compute units `ane`).

After Apple's "Deploying Transformers on the Apple Neural Engine": hidden states are
channels-first [1, C, 1, T], every linear is a 1x1 conv, attention is split per head
(one [E, hd] x [hd, T] matmul each, keys on the leading axis so softmax runs over
axis 0), and no tensor has rank above 4. Same module tree, weights, inputs, outputs and
states as the standard layout: only `forward` differs, so the IR stays target-neutral.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...compiler.lowering.module import LMLP, LMoE
from .module import CoreMLLM, act


def _conv(x, lin):
    return F.conv2d(x, lin.weight[:, :, None, None], lin.bias)


def _scaled(x, eps, fp16):
    """x / s and eps / s^2 for s = max |x| over channels: fp16 squares stay finite (see CNorm)."""
    if not fp16:
        return x, eps
    s = x.abs().amax(1, keepdim=True).clamp(min=1e-4)
    return x / s, eps / s / s


def _norm(x, n, fp16):
    """RMSNorm over channels (axis 1); the mean of squares as a 1-output conv."""
    x, eps = _scaled(x, n.eps_vec, fp16)
    ms = F.conv2d(x * x, n.mean_row[:, :, None, None])
    return x * torch.rsqrt(ms + eps) * (n.weight + n.offset)[None, :, None, None]


def _head_norm(x, n, fp16):
    """RMSNorm of [heads, hd, T] over hd (axis 1)."""
    x, eps = _scaled(x, n.eps_vec, fp16)
    ms = torch.matmul(n.mean_row, x * x)
    return x * torch.rsqrt(ms + eps) * (n.weight + n.offset)[None, :, None]


def _mlp(x, m: LMLP):
    if m.fused:
        g, u = _conv(x, m.gate_up).chunk(2, dim=1)
    else:
        g, u = _conv(x, m.gate), _conv(x, m.up)
    return _conv(act(m.act, g) * u, m.down)


def _moe(x, m: LMoE):
    probs = torch.softmax(_conv(x, m.router), dim=1)  # [1, experts, 1, T]
    top_w, top_i = probs.topk(m.top_k, dim=1)
    if m.norm:
        top_w = top_w / top_w.sum(1, keepdim=True)
    out = torch.zeros_like(x)
    for e, expert in enumerate(m.experts):  # weight of expert e per token, [1, 1, 1, T]
        w = (top_w * (top_i == e).to(x.dtype)).sum(1, keepdim=True)
        out = out + _mlp(x, expert) * w
    if m.shared is not None:
        s = _mlp(x, m.shared)
        if m.shared_gate is not None:
            s = torch.sigmoid(_conv(x, m.shared_gate)) * s
        out = out + s
    return out


def _attention(a, x, cos, sin, mask, kc, vc, start, end, inplace, fp16):
    """x [1, C, 1, T]; cos/sin [hd, T]; mask [E, T] (keys first); kc/vc one layer of the cache."""
    h, kvh, hd = a.h, a.kvh, a.hd
    if a.fused:
        q, k, v = _conv(x, a.qkv).split([h * hd, kvh * hd, kvh * hd], 1)
    else:
        q, k, v = _conv(x, a.q), _conv(x, a.k), _conv(x, a.v)
    q, k, v = q.view(h, hd, -1), k.view(kvh, hd, -1), v.view(kvh, hd, -1)
    if a.q_norm is not None:
        q, k = _head_norm(q, a.q_norm, fp16), _head_norm(k, a.k_norm, fp16)
    q = q * cos + torch.matmul(a.rot_t, q) * sin  # rot_t = R^T: rotate-half on the channel axis
    k = k * cos + torch.matmul(a.rot_t, k) * sin
    # cache rows are [kvh, L, hd] (BHSD) or [L, kvh, hd] (BSHD), as in the standard layout
    k_new = k.permute(2, 0, 1) if a.bshd else k.transpose(1, 2)
    v_new = v.permute(2, 0, 1) if a.bshd else v.transpose(1, 2)
    if inplace:
        (kc[start:end] if a.bshd else kc[:, start:end]).copy_(k_new)
        (vc[start:end] if a.bshd else vc[:, start:end]).copy_(v_new)
    else:
        axis = 0 if a.bshd else 1
        kc = torch.slice_scatter(kc, k_new, axis, start, end)
        vc = torch.slice_scatter(vc, v_new, axis, start, end)
    keys = kc[:end].transpose(0, 1) if a.bshd else kc[:, :end]  # [kvh, E, hd]
    values = vc[:end].transpose(0, 1) if a.bshd else vc[:, :end]
    rep, outs = h // kvh, []
    for i in range(h):  # split heads: small rank-2 matmuls the Neural Engine maps well
        g = i // rep
        s = torch.matmul(keys[g], q[i]) * a.scale  # [E, T]
        if a.softcap is not None:
            s = torch.tanh(s / a.softcap) * a.softcap
        p = torch.softmax(s + mask, dim=0)
        outs.append(torch.matmul(values[g].transpose(0, 1), p))  # [hd, T]
    out = torch.cat(outs, dim=0).view(1, h * hd, 1, -1)
    return _conv(out, a.o), kc, vc


class CoreMLLMANE(CoreMLLM):
    """CoreMLLM computed channels-first; same signature, weights and caches."""

    def forward(self, input_ids, causal_mask, key_cache=None, value_cache=None):
        T, end = input_ids.shape[1], causal_mask.shape[-1]
        start, f16 = end - T, self.fp16
        # rows of the conv-shaped table: a tied lm_head (a 1x1 conv) then stores it once
        x = torch.index_select(self.embed[:, :, None, None], 0, input_ids[0]).permute(2, 1, 3, 0)  # [1, C, 1, T]
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        pos = torch.arange(T) + start
        keys = torch.arange(end)[:, None]
        ok = keys <= pos[None, :]  # [E, T]: keys first
        extra = causal_mask[0, 0].transpose(0, 1)  # [E, T or 1]
        masks = [torch.where(ok if w is None else torch.logical_and(ok, pos[None, :] - keys < w), 0.0, float("-inf")) + extra
                 for w in self.windows]
        ropes = [(getattr(self, f"rope_cos{i}")[start:end].transpose(0, 1),
                  getattr(self, f"rope_sin{i}")[start:end].transpose(0, 1)) for i in range(self.n_ropes)]
        kcs, vcs = (self.keyCache, self.valueCache) if self.stateful else (key_cache, value_cache)
        new_k, new_v = [], []
        for d, b in enumerate(self.layers):
            blk, (cos, sin) = self.blocks[b], ropes[self.layer_rope[d]]
            h, kc, vc = _attention(blk.attn, _norm(x, blk.attn_norm, f16), cos, sin, masks[self.layer_window[d]],
                                   kcs[d], vcs[d], start, end, self.stateful, f16)
            new_k.append(kc)
            new_v.append(vc)
            if blk.post_attn is not None:
                h = _norm(h, blk.post_attn, f16)
            x = x + h
            n = _norm(x, blk.ffn_norm, f16)
            h = _mlp(n, blk.ffn) if isinstance(blk.ffn, LMLP) else _moe(n, blk.ffn)
            if blk.post_ffn is not None:
                h = _norm(h, blk.post_ffn, f16)
            x = x + h
        x = _norm(x, self.final_norm, f16)
        logits = F.conv2d(x, self.head.weight[:, :, None, None], self.head.bias).squeeze(2).transpose(1, 2)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits if self.stateful else (logits, torch.stack(new_k), torch.stack(new_v))
