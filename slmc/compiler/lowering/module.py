"""Lowering: IR -> an export-friendly torch module built from plain ops.

Every target starts here: one decoder (`LoweredLM`), built from the components a target
picks in `LoweringSpec.components` (components.py), with one of two calling conventions:
- "runner": ExecuTorch's LLM-runner convention, `forward(tokens[1, T], input_pos[1]) -> logits`,
  one K and one V cache per depth (even where depths share a block's weights), as mutable
  buffers or as inputs returned updated (LiteRT);
- "swift": swift-transformers' Core ML convention, `forward(inputIds[1, T], causalMask[1, 1, T, E])
  -> logits[1, T, vocab]` with start = E - T and all layers stacked in keyCache/valueCache.
Only ops every runtime has are used: no fused rms_norm, no SDPA custom ops, no
data-dependent shapes (`input_pos` is a tensor, never `.item()`).

Shared IR weights become one shared Parameter, so every exporter stores them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...errors import UnsupportedError
from ..ir import MLP, Block, Model
from .attention import AttnContext, LAttention
from .cache import scale_shape
from .components import Components
from .layers import LMLP, LMoE, _Params, head_projection, zeros_untouched
from .math import rope_tables, softcap
from .quantized import unwrap
from .ring import ring_masks, ring_slots


@dataclass(frozen=True)
class LoweringSpec:
    full_logits: bool = False  # False: logits of the last position only, [1, vocab] (runner)
    # "runner" or "swift" (Core ML), see the module docstring
    interface: str = "runner"
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
    # the integer type of positions, and of the key and row indices built from them: LiteRT
    # takes int32 (its converter rewrites every int64 arange to int32, then re-traces the whole
    # program once more to do it)
    index_dtype: torch.dtype = torch.int64
    # True: each QuantWeight becomes its exact dequantized float (a plain constant) for a
    # target that puts the codes back itself (LiteRT: targets/tflite/codes.py). "shape": an
    # uninitialized float tensor of its shape instead, for a target that converts its weights
    # as inputs and puts the codes in without reading it (LiteRT: targets/tflite/weights.py).
    dequantize: bool | str = False
    # the decoder's components (components.py)
    components: Components = field(default_factory=Components)

class LBlock(nn.Module):
    def __init__(self, b: Block, P: _Params, C: Components, bshd: bool = False, v_columns: bool = False):
        super().__init__()
        cf = C.channels_first
        self.attn_norm, self.attn = C.norm(b.attn_norm, P, cf), LAttention(b.attn, P, C, bshd, v_columns)
        self.ffn_norm = C.norm(b.ffn_norm, P, cf)
        self.ffn = LMLP(b.ffn, P, C) if isinstance(b.ffn, MLP) else LMoE(b.ffn, P, C)
        self.post_attn = C.norm(b.post_attn_norm, P, cf) if b.post_attn_norm is not None else None
        self.post_ffn = C.norm(b.post_ffn_norm, P, cf) if b.post_ffn_norm is not None else None

    def attention(self, x, ctx: AttnContext, k_cache, v_cache):
        """The attention sublayer with its residual."""
        h, k_cache, v_cache = self.attn(self.attn_norm(x), ctx, k_cache, v_cache)
        if self.post_attn is not None:
            h = self.post_attn(h)
        return x + h, k_cache, v_cache

    def feed_forward(self, x, ffn):
        """The FFN sublayer (ffn: the MLP or MoE) with its residual."""
        h = ffn(self.ffn_norm(x))
        if self.post_ffn is not None:
            h = self.post_ffn(h)
        return x + h

    def forward(self, x, ctx: AttnContext, k_cache, v_cache):
        x, k_cache, v_cache = self.attention(x, ctx, k_cache, v_cache)
        return self.feed_forward(x, self.ffn), k_cache, v_cache


class LoweredLM(nn.Module):
    """runner, kv="buffers": forward(tokens[1, T] int64, input_pos[1] int64) -> logits;
    runner, kv="io": forward(tokens, input_pos, k_0, v_0, k_1, ...) -> (logits, k_0', v_0', ...);
    swift: forward(inputIds[1, T] int32, causalMask[1, 1, T, E][, keyCache, valueCache]) ->
    logits[1, T, vocab][, keyCache', valueCache'] (the caches only when kv="io")."""

    def __init__(self, model: Model, spec: LoweringSpec = LoweringSpec()):
        super().__init__()
        kv, C = model.kv, spec.components
        if spec.interface not in ("runner", "swift"):
            raise ValueError(f"LoweringSpec.interface must be 'runner' or 'swift', not {spec.interface!r}")
        if spec.kv not in ("buffers", "io"):
            raise ValueError(f"LoweringSpec.kv must be 'buffers' or 'io', not {spec.kv!r}")
        if spec.positions not in ("start", "tokens"):
            raise ValueError(f"LoweringSpec.positions must be 'start' or 'tokens', not {spec.positions!r}")
        self.swift = spec.interface == "swift"
        core = C.attention
        if core.stacked != self.swift or core.channels_first != C.channels_first:
            raise ValueError(f"attention core {type(core).__name__} does not fit interface={spec.interface!r} "
                             f"with projection {C.projection.__name__}")
        if kv.dtype not in ("float32", "float16", "int8") or kv.arena and not self.swift:
            raise UnsupportedError(
                f"this lowering holds a fp32/fp16/int8 cache per layer; KV spec dtype={kv.dtype} "
                f"arena={kv.arena} is not lowered yet", "kv")
        # ring buffer: (window, sinks); the cache has `window` slots (ring.py)
        self.ring = kv.ring
        if self.ring and spec.mask_input:
            raise UnsupportedError("a ring-buffer cache builds its own mask; mask_input is for linear caches", "kv")
        bshd = kv.layout == "bshd"
        self.v_columns = not self.swift and core.columns(kv)  # V caches [1, kvh, hd, L]
        self.spec, self.max_len, self.channels_first = spec, kv.max_len, C.channels_first
        self.cache_dtype = {"float16": torch.float16, "int8": torch.int8}.get(kv.dtype, spec.dtype)
        self.int8 = kv.dtype == "int8"  # each cache is (codes, scales per token and head)
        P = _Params(self, spec.dtype, spec.dequantize)
        self.ir_params = P.memo  # id(IR weight) -> its Parameter, for targets that place weights themselves
        self.embedding = C.embedding(model.embed, P)
        if C.channels_first and getattr(self.embedding, "swapped", False):
            raise ValueError("a pair-swapped embedding table is for the tokens layout; channels-first looks rows up itself")
        self.embed_scale = model.embed_scale
        self.blocks = nn.ModuleList(LBlock(b, P, C, bshd, self.v_columns) for b in model.blocks)
        self.layers = list(model.layers)
        self.final_norm = C.norm(model.final_norm, P, C.channels_first)
        self.head = head_projection(model, P, C.projection)
        self.final_softcap = model.final_logit_softcap
        # One rope table per distinct rope config, one mask per distinct window.
        rope_keys, self.windows, self.layer_rope, self.layer_window = [], [], [], []
        for d in range(model.n_layers):
            a = model.block_at(d).attn
            key = (a.rope.theta, a.rope.dim, a.head_dim, repr(a.rope.scaling))
            if key not in rope_keys:
                cos, sin = rope_tables(a.rope, kv.max_len, a.head_dim)
                self.register_buffer(f"rope_cos{len(rope_keys)}", cos.to(spec.dtype), persistent=False)
                self.register_buffer(f"rope_sin{len(rope_keys)}", sin.to(spec.dtype), persistent=False)
                rope_keys.append(key)
            if a.sliding_window not in self.windows:
                self.windows.append(a.sliding_window)
            self.layer_rope.append(rope_keys.index(key))
            self.layer_window.append(self.windows.index(a.sliding_window))
        self.n_ropes = len(rope_keys)
        if self.swift:
            self._stacked_caches(model, bshd)
        else:
            self._layer_caches(model, bshd)
        if P.quantized:  # torchao Intx weights -> dequantize_affine, which every converter maps
            unwrap(self)

    def _layer_caches(self, model: Model, bshd: bool) -> None:
        slots = model.kv.window if self.ring else model.kv.max_len
        self.cache_shapes = []  # per depth: (K shape, V shape)
        for d in range(model.n_layers):
            a = model.block_at(d).attn
            rows = (1, slots, a.n_kv_heads, a.head_dim) if bshd else (1, a.n_kv_heads, slots, a.head_dim)
            self.cache_shapes.append((rows, (1, a.n_kv_heads, a.head_dim, slots) if self.v_columns else rows))
        if self.spec.kv == "buffers":
            for d, shapes in enumerate(self.cache_shapes):
                for kv_name, shape in zip("kv", shapes):
                    self.register_buffer(f"{kv_name}_cache_{d}", zeros_untouched(shape, self.cache_dtype))
                    if self.int8:
                        self.register_buffer(f"{kv_name}_cache_scale_{d}", torch.zeros(scale_shape(shape),
                                                                                     dtype=self.spec.dtype))

    def _stacked_caches(self, model: Model, bshd: bool) -> None:
        """keyCache/valueCache [layers, kvh, L, hd] (BHSD) or [layers, L, kvh, hd] (BSHD)."""
        a, kv = model.block_at(0).attn, model.kv
        row = (kv.max_len, a.n_kv_heads) if bshd else (a.n_kv_heads, kv.max_len)
        self.cache_shape = (model.n_layers, *row, a.head_dim)
        if self.spec.kv == "buffers":  # fp32 here; Core ML declares its states fp16 (it has no other)
            self.register_buffer("keyCache", zeros_untouched(self.cache_shape, torch.float32))
            self.register_buffer("valueCache", zeros_untouched(self.cache_shape, torch.float32))

    def empty_caches(self, zero: bool = True) -> list[torch.Tensor]:
        """Zero K and V tensors per depth, in forward's argument order (kv="io"); an int8
        cache is two tensors (codes, then scales). zero=False: uninitialized, for tracing
        samples no one reads (their untouched pages take no memory)."""
        new = torch.zeros if zero else torch.empty
        if self.swift:
            return [new(self.cache_shape), new(self.cache_shape)]
        out = []
        for shapes in self.cache_shapes:
            for s in shapes:
                out.append(new(s, dtype=self.cache_dtype))
                if self.int8:
                    out.append(new(scale_shape(s), dtype=self.spec.dtype))
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
        """runner: (tokens, input_pos, [mask,] caches...); swift: (inputIds, causalMask[, keyCache,
        valueCache]), the second argument standing where input_pos stands."""
        if self.swift:
            return self._swift(tokens, input_pos, *rest)
        T = tokens.shape[1]
        pad = None
        if self.spec.padded:
            pad = (torch.arange(T, dtype=self.spec.index_dtype) > 0) & (input_pos == 0)
            input_pos = input_pos[:1]
        if self.spec.positions == "tokens":
            positions = input_pos
        else:
            positions = input_pos + torch.arange(T, dtype=self.spec.index_dtype)
        mask_in, caches = (rest[0], rest[1:]) if self.spec.mask_input else (None, rest)
        x = self._embed(tokens)
        keys = torch.arange(self.max_len, dtype=self.spec.index_dtype)
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
        io = self.spec.kv == "io"

        def context(d):
            return AttnContext(*ropes[self.layer_rope[d]],
                               masks[self.layer_window[d]] if mask_in is None else mask_in[0, 0],
                               inplace=not io, positions=positions, slots=slots, pad=pad)

        x, k_new, v_new = self._layers(x, context, lambda d: (self._cache(caches, d, 0), self._cache(caches, d, 1)))
        if not self.spec.full_logits:
            x = x[:, -1, :]
        logits = self._logits(x)
        if not io:
            return logits
        updated = []
        for kc, vc in zip(k_new, v_new):
            updated += [*kc, *vc] if self.int8 else [kc, vc]
        return (logits, *updated)

    def _swift(self, input_ids, causal_mask, key_cache=None, value_cache=None):
        """Core ML: start = E - T from the shapes; the model masks causally (and by sliding
        window) itself, so swift-transformers' zero mask is valid."""
        T, end = input_ids.shape[1], causal_mask.shape[-1]
        start, cf = end - T, self.channels_first
        x = self._embed(input_ids)
        pos = torch.arange(T) + start
        masks = []
        if cf:  # keys first: [E, T]
            keys = torch.arange(end)[:, None]
            ok = keys <= pos[None, :]
            extra = causal_mask[0, 0].transpose(0, 1)  # [E, T or 1]
            masks = [torch.where(ok if w is None else torch.logical_and(ok, pos[None, :] - keys < w), 0.0,
                                 float("-inf")) + extra for w in self.windows]
            ropes = [(getattr(self, f"rope_cos{i}")[start:end].transpose(0, 1),
                      getattr(self, f"rope_sin{i}")[start:end].transpose(0, 1)) for i in range(self.n_ropes)]
        else:
            ok = torch.arange(end)[None, :] <= pos[:, None]
            for w in self.windows:
                allowed = ok if w is None else torch.logical_and(ok, pos[:, None] - torch.arange(end)[None, :] < w)
                masks.append(torch.where(allowed, 0.0, float("-inf")) + causal_mask[0, 0])
            ropes = [(getattr(self, f"rope_cos{i}")[start:end, None, :],
                      getattr(self, f"rope_sin{i}")[start:end, None, :]) for i in range(self.n_ropes)]
        stateful = self.spec.kv == "buffers"
        kcs, vcs = (self.keyCache, self.valueCache) if stateful else (key_cache, value_cache)

        def context(d):
            return AttnContext(*ropes[self.layer_rope[d]], masks[self.layer_window[d]], inplace=stateful,
                               span=(start, end))

        # states: layer views written in place; io: updated copies, stacked again
        x, k_new, v_new = self._layers(x, context, lambda d: (kcs[d], vcs[d]))
        logits = self._logits(x)
        return logits if stateful else (logits, torch.stack(k_new), torch.stack(v_new))

    def _embed(self, tokens):
        if self.channels_first:
            # rows of the conv-shaped table: a tied lm_head (a 1x1 conv) then stores it once
            table = self.embedding.weight[:, :, None, None]
            x = torch.index_select(table, 0, tokens[0]).permute(2, 1, 3, 0)  # [1, C, 1, T]
        else:
            x = self.embedding(tokens)
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    def _layers(self, x, context_at, caches_at):
        """Every depth in order; context_at(d) -> AttnContext, caches_at(d) -> (K, V) caches.
        Returns x and each depth's K and V caches after the call."""
        k_new, v_new = [], []
        for d, b in enumerate(self.layers):
            kc, vc = caches_at(d)
            x, kc, vc = self.blocks[b](x, context_at(d), kc, vc)
            k_new.append(kc)
            v_new.append(vc)
        return x, k_new, v_new

    def _logits(self, x):
        logits = self.head(self.final_norm(x))
        if self.channels_first:  # [1, vocab, 1, T] -> [1, T, vocab]
            logits = logits.squeeze(2).transpose(1, 2)
        return softcap(logits, self.final_softcap) if self.final_softcap is not None else logits

    def reset_cache(self) -> None:
        for name, buf in self.named_buffers():
            if "_cache_" in name or name in ("keyCache", "valueCache"):
                buf.zero_()


class SwiftLM(LoweredLM):
    """LoweredLM with interface="swift", under the argument names torch.export gives the Core ML
    converter (inputIds, causalMask and, for kv="io", the two stacked caches)."""

    def __init__(self, model: Model, spec: LoweringSpec):
        if spec.interface != "swift":
            raise ValueError("SwiftLM takes a LoweringSpec with interface='swift'")
        super().__init__(model, spec)

    def forward(self, input_ids, causal_mask, key_cache=None, value_cache=None):
        return self._swift(input_ids, causal_mask, key_cache, value_cache)
