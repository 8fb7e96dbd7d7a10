"""The decoder's components other than attention: weights, projections, norms, RoPE, MLP, MoE.

Each comes in the variants targets choose between in a `Components` table (components.py).
Two layouts exist: "tokens" ([1, T, C], the default) and channels-first ([1, C, 1, T], the
Core ML Neural Engine layout), picked by the projection component (`Conv1x1.channels_first`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import spill as _spill
from ..ir import MLP, Linear, Model, MoE, Norm, QuantWeight, Weight
from .quantized import intx_parameter


def zeros_untouched(shape, dtype: torch.dtype) -> torch.Tensor:
    """Zeros in fresh anonymous pages (an mmap), not written: they stay out of the RSS until
    something writes them. The KV caches' initial state, which an exporter only reads or
    hashes (read faults map the kernel's zero page): 90 MiB of SmolLM2-135M's at 2048."""
    import mmap

    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if n < 1 << 16:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, n), dtype=dtype).view(shape)


class _Params:
    """Turns IR weights into Parameters, one per IR object (shared blocks stay shared)."""

    def __init__(self, owner: nn.Module, dtype: torch.dtype, dequantize: bool = False):
        self.owner, self.dtype, self.memo, self.quantized = owner, dtype, {}, False
        self.dequantize = dequantize
        self.spill = None  # made on first use; its file lives as long as a tensor maps it

    def _file_backed(self, t: torch.Tensor) -> torch.Tensor:
        """`t`, or its copy mapped from a scratch file when `t` is heap memory: an exporter
        then reads each weight's pages as it goes, and page_out_weights lets them go again,
        instead of the whole model staying resident through the lowering (issue 17)."""
        if t.nbytes < _spill.MIN_BYTES or _spill.file_backed(t):
            return t
        if self.spill is None:
            self.spill = _spill.Spill("lowering")
        return self.spill.mapped(t)

    def _float(self, w) -> torch.Tensor:
        """`w` in the module's float dtype, contiguous (serializers read a constant's storage in
        memory order, see quantized.py) and, when big, mapped from a scratch file. A checkpoint
        tensor in another dtype, and a QuantWeight's dequantized image, are written into the file in
        pieces, never whole on the heap."""
        quant = isinstance(w, QuantWeight)
        numel = w.codes.numel() if quant else w.data.numel() if isinstance(w, Weight) else 0
        big = numel * torch.empty((), dtype=self.dtype).element_size() >= _spill.MIN_BYTES
        if big and (quant or w.data.dtype != self.dtype):
            if self.spill is None:
                self.spill = _spill.Spill("lowering")
            return self.spill.dequantized(w, self.dtype) if quant else self.spill.converted(w.data, self.dtype)
        return self._file_backed(w.float().to(self.dtype).contiguous())

    def __call__(self, w) -> nn.Parameter:
        if w is None:
            return None
        if id(w) not in self.memo and isinstance(w, QuantWeight) and not self.dequantize:
            # not also registered on the owner: unwrap_tensor_subclass would parametrize the
            # same tensor twice in one module, which export then counts as two inputs
            self.quantized = True
            self.memo[id(w)] = intx_parameter(w, self.dtype)
        if id(w) not in self.memo:
            if isinstance(w, QuantWeight) and self.dequantize == "shape":
                # never read (its pages are never touched, so they take no memory)
                p = nn.Parameter(torch.empty(tuple(w.shape), dtype=self.dtype), requires_grad=False)
            else:
                p = nn.Parameter(self._float(w), requires_grad=False)
            if isinstance(w, Weight) and w.loaded and p.data_ptr() != w.data.data_ptr():
                # the Parameter is a copy (converted, or mapped from a scratch file): the IR's
                # own copy goes if it can be read again, else the IR shares the mapped one
                if w._loader is not None:
                    w.release()
                elif p.dtype == w.data.dtype:
                    w.rebind(p.data)
            self.owner.register_parameter(f"w{len(self.memo)}", p)
            self.memo[id(w)] = p
        return self.memo[id(w)]


# --- projections ---------------------------------------------------------------------------------

class LLinear(nn.Module):
    """A linear layer on [.., C] (the tokens layout)."""

    channels_first = False

    def __init__(self, lin: Linear, P: _Params):
        super().__init__()
        self.weight, self.bias = P(lin.weight), P(lin.bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv1x1(LLinear):
    """The same weights as a 1x1 convolution on channels-first [1, C, 1, T] (the ANE layout)."""

    channels_first = True

    def forward(self, x):
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


def head_projection(model: Model, P: _Params, projection: type = LLinear) -> LLinear:
    """The output head as a child module, also when tied: a quantized table that the top
    module read twice would be parametrized twice by unwrap_tensor_subclass (two export inputs)."""
    return projection(model.lm_head if model.lm_head is not None else Linear(model.embed), P)


# --- embedding -----------------------------------------------------------------------------------

class LEmbedding(nn.Module):
    """The table's rows for tokens [1, T] -> [1, T, C] (the tokens layout)."""

    def __init__(self, table, P: _Params):
        super().__init__()
        self.weight = P(table)

    def forward(self, tokens):
        return F.embedding(tokens, self.weight)


def pairs_swappable(w) -> bool:
    """An int4 table whose columns can swap in pairs inside each group (scales unchanged)."""
    return isinstance(w, QuantWeight) and w.bits == 4 and w.shape[1] % 2 == 0 and w.group_size % 2 == 0


def pairs_swapped(w: QuantWeight) -> QuantWeight:
    """w with columns 2i and 2i+1 exchanged: the same groups, so the same scales and zeros."""
    rows, cols = w.shape
    codes = w.codes.reshape(rows, cols // 2, 2).flip(-1).reshape(rows, cols)
    out = dataclasses.replace(w, codes=codes)
    # a new table (a 128k-row vocabulary's: 262 MiB) held through the whole lowering: it goes
    # to scratch space like the pass-made codes (spill.Spill.quant), not the heap
    _spill.Spill("lowering: swapped embedding codes").quant(out)
    return out


class PairSwappedEmbedding(LEmbedding):
    """An int4 table stored with each pair of columns swapped, swapped back after the lookup
    (one flip of [1, T, C/2, 2], a few hundred floats per token). Why: ExecuTorch's
    embedding_4bit packs a byte's two codes high nibble first and XNNPACK packs a linear's low
    nibble first, so a tied table's codes make two byte images; swapped, embedding_4bit's bytes
    are the XNNPACK head's, and model.ptd keeps one copy (targets/executorch/program.py)."""

    def __init__(self, table, P: _Params):
        nn.Module.__init__(self)
        self.swapped = pairs_swappable(table)
        self.weight = P(pairs_swapped(table) if self.swapped else table)

    def forward(self, tokens):
        x = F.embedding(tokens, self.weight)
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) if self.swapped else x


# --- norms ---------------------------------------------------------------------------------------

class LNorm(nn.Module):
    """RMSNorm in plain ops (Core ML rejects aten.rms_norm), the mean of squares as a 1-row
    linear: XNNPACK delegates linear but not mean.dim, and every undelegated op splits the graph
    into another delegate call. Channels-first: over axis 1, as a 1-output conv (rank 4) or a
    matmul (the q/k norms' [heads, hd, T])."""

    def __init__(self, n: Norm, P: _Params, channels_first: bool = False):
        super().__init__()
        self.weight, self.eps, self.offset = P(n.weight), n.eps, 1.0 if n.unit_offset else 0.0
        self.channels_first = channels_first
        d = n.weight.shape[0]
        self.register_buffer("mean_row", torch.full((1, d), 1.0 / d, dtype=P.dtype), persistent=False)
        # eps as a [1] tensor, not a scalar: coremltools fuses "linear + constant" into the
        # linear's bias and fails on a 0-d constant.
        self.register_buffer("eps_vec", torch.full((1,), n.eps, dtype=P.dtype), persistent=False)

    def forward(self, x):
        if self.channels_first:
            return self._channels(x, self.eps_vec)
        ms = F.linear(x * x, self.mean_row)
        return x * torch.rsqrt(ms + self.eps_vec) * (self.weight + self.offset)

    def _channels(self, x, eps):
        if x.dim() == 4:
            ms = F.conv2d(x * x, self.mean_row[:, :, None, None])
            return x * torch.rsqrt(ms + eps) * (self.weight + self.offset)[None, :, None, None]
        ms = torch.matmul(self.mean_row, x * x)
        return x * torch.rsqrt(ms + eps) * (self.weight + self.offset)[None, :, None]


class ScaledNorm(LNorm):
    """RMSNorm that survives fp16 (Core ML): x * x overflows past |x| = 256 (SmolLM2's residual
    stream reaches 2e4), so each row is first divided by its max |x|. The same norm exactly:
    x/s * rsqrt(mean((x/s)^2) + eps/s^2) == x * rsqrt(mean(x^2) + eps) for any s > 0."""

    def forward(self, x):
        if self.channels_first:
            s = x.abs().amax(1, keepdim=True).clamp(min=1e-4)
            return self._channels(x / s, self.eps_vec / s / s)
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-4)
        xs = x / s
        return xs * torch.rsqrt(F.linear(xs * xs, self.mean_row) + self.eps_vec / s / s) * (self.weight + self.offset)


# --- RoPE: x * cos + rotate_half(x) * sin ---------------------------------------------------------

def rope_matmul(x, cos, sin, attn):
    """rotate_half as a [head_dim, head_dim] matmul (attn.rot_t = R^T): no slices of
    dynamic-length tensors, which XNNPACK would split the graph around."""
    return x * cos + F.linear(x, attn.rot_t) * sin


def rope_slices(x, cos, sin, attn):
    """rotate_half as slices and a concat: cheaper where no delegate keeps the graph whole
    (LiteRT); the tail past the rotary dims meets sin = 0."""
    r = attn.rope_dim
    h = r // 2
    parts = [-x[..., h:r], x[..., :h]] + ([x[..., r:]] if r < x.shape[-1] else [])
    return x * cos + torch.cat(parts, -1) * sin


def rope_channels(x, cos, sin, attn):
    """rotate_half as a matmul on the channel axis of [heads, hd, T] (channels-first layout)."""
    return x * cos + torch.matmul(attn.rot_t, x) * sin


# --- MLP and MoE ---------------------------------------------------------------------------------

class LMLP(nn.Module):
    def __init__(self, m: MLP, P: _Params, C):
        super().__init__()
        self.act, self.activation = m.act, C.activation
        self.fused = m.fused
        proj = C.projection
        self.axis = 1 if proj.channels_first else -1
        if m.fused:
            self.gate_up = proj(m.gate_up, P)
        else:
            self.gate, self.up = proj(m.gate, P), proj(m.up, P)
        self.down = proj(m.down, P)

    def forward(self, x):
        if self.fused:
            g, u = self.gate_up(x).chunk(2, dim=self.axis)
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(self.activation(self.act, g) * u)


class LMoE(nn.Module):
    """Dense-compute MoE: every expert runs, weights are zero off the top-k.

    Static shapes and no data-dependent control flow, so it exports everywhere;
    sparse execution is the job of the expert-offload pass and its runner.
    """

    def __init__(self, m: MoE, P: _Params, C):
        super().__init__()
        self.router = C.projection(m.router, P)
        self.experts = nn.ModuleList(LMLP(e, P, C) for e in m.experts)
        self.top_k, self.norm = m.top_k, m.norm_topk_prob
        self.shared = LMLP(m.shared, P, C) if m.shared is not None else None
        self.shared_gate = C.projection(m.shared_gate, P) if m.shared_gate is not None else None
        self.channels_first = C.projection.channels_first

    def forward(self, x):
        axis = 1 if self.channels_first else -1  # experts on axis 1 of [1, E, 1, T]
        probs = torch.softmax(self.router(x), dim=axis)
        top_w, top_i = probs.topk(self.top_k, dim=axis)
        if self.norm:
            top_w = top_w / top_w.sum(axis, keepdim=True)
        if self.channels_first:  # one_hot would make a rank-5 tensor, past the ANE's rank 4
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):  # weight of expert e per token, [1, 1, 1, T]
                w = (top_w * (top_i == e).to(x.dtype)).sum(1, keepdim=True)
                out = out + expert(x) * w
        else:
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
