"""The component table: which variant of each decoder piece a target's lowering uses.

A target passes one `Components` in its LoweringSpec; the decoder (module.py) is the same
for all of them. Targets choose components; they never fork the forward or swap modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .attention import RowCacheAttention
from .layers import LEmbedding, LLinear, LNorm, rope_matmul
from .math import activation


@dataclass(frozen=True)
class Components:
    # norm(ir_norm, params, channels_first) -> module: LNorm (plain RMS), ScaledNorm (fp16-safe,
    # max-scaled rows: Core ML fp16), or a target's own LNorm subclass (LiteRT's composite)
    norm: type = LNorm
    # rope(x, cos, sin, attention) -> x rotated: rope_matmul (XNNPACK), rope_slices (LiteRT),
    # rope_channels (channels-first heads, ANE)
    rope: Callable = rope_matmul
    # LLinear on [1, T, C], or Conv1x1 on channels-first [1, C, 1, T] (the ANE layout)
    projection: type = LLinear
    # activation(name, x): torch's ops, or gelu_tanh spelled out (Core ML)
    activation: Callable = activation
    # the attention core with its cache writer (attention.py)
    attention: object = field(default_factory=RowCacheAttention)
    # embedding(table, params) -> tokens [1, T] to [1, T, C]: LEmbedding (a lookup), or
    # PairSwappedEmbedding (ExecuTorch: an int4 table in the byte order of XNNPACK's head).
    # The channels-first layout looks rows up itself (module.py).
    embedding: type = LEmbedding

    @property
    def channels_first(self) -> bool:
        return self.projection.channels_first

