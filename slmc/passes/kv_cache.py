"""kv.cache: choose the KV-cache contract (layout, dtype, ring window, sinks, arena).

The IR's KVCacheSpec is what every target lowers natively (mutable buffers, Core ML
states, LiteRT signature I/O) and what the reference executor models (an fp16 cache
rounds K and V to half precision). A target that cannot express a combination refuses
it at compile time with the reason; nothing is emitted that silently differs.
The max length stays what --max-seq-len set.

Before:                                  After (dtype=float16, layout=bshd):
  kv cache: 2048 x bhsd float32            kv cache: 2048 x bshd float16
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compiler.ir import KV_DTYPES, KV_LAYOUTS, Model
from ..compiler.pass_manager import Pass, PassResult, register
from ..errors import SlmcError


@dataclass(frozen=True)
class KVCacheOptions:
    layout: str = ""  # bhsd | bshd ("" keeps it)
    dtype: str = ""  # float32 | float16 | int8 ("" keeps it)
    window: int = 0  # > 0: a ring buffer of this many positions
    sink_tokens: int = 0  # attention-sink positions kept when the ring wraps
    arena: bool = False  # one preallocated buffer with per-layer views


@register
class KVCache(Pass):
    name = "kv.cache"
    Options = KVCacheOptions

    def run(self, ir: Model) -> PassResult:
        o, kv, where = self.options, ir.kv, "--pass kv.cache"
        if o.layout and o.layout not in KV_LAYOUTS:
            raise SlmcError(f"layout {o.layout!r}: one of {', '.join(KV_LAYOUTS)}", where)
        if o.dtype and o.dtype not in KV_DTYPES:
            raise SlmcError(f"dtype {o.dtype!r}: one of {', '.join(KV_DTYPES)}", where)
        if o.window < 0 or (o.window and o.window > kv.max_len):
            raise SlmcError(f"window {o.window} must be in 1..max_len={kv.max_len} (0: no ring)", where)
        if o.sink_tokens < 0 or (o.sink_tokens and not (o.window and o.sink_tokens < o.window)):
            raise SlmcError(f"sink_tokens {o.sink_tokens} needs a window larger than it", where)
        before = (kv.layout, kv.dtype, kv.window, kv.sink_tokens, kv.arena)
        kv.layout = o.layout or kv.layout
        kv.dtype = o.dtype or kv.dtype
        kv.window = o.window or None
        kv.sink_tokens, kv.arena = o.sink_tokens, o.arena
        after = (kv.layout, kv.dtype, kv.window, kv.sink_tokens, kv.arena)
        return PassResult(ir, after != before, {"kv_cache": dict(zip(
            ("layout", "dtype", "window", "sink_tokens", "arena"), after))})
