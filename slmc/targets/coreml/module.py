"""The Core ML decoder: slmc's one lowered decoder (LoweredLM) with swift-transformers' interface
(inputIds, causalMask -> start = E - T) over one stacked KV cache (states keyCache/valueCache,
or inputs returned updated), and the components Core ML needs:
- gelu_tanh spelled out (coremltools 9 converts torch's approximate="tanh" as exact gelu);
- in fp16, the max-scaled RMSNorm (x * x overflows fp16 past |x| = 256);
- the Neural Engine layout (compute units `ane`), after Apple's "Deploying Transformers on the
  Apple Neural Engine": channels-first [1, C, 1, T] hidden states, every linear a 1x1 conv,
  attention split per head (keys on the leading axis, softmax over axis 0), no tensor above
  rank 4. Same weights, inputs, outputs and states as the standard layout.
"""

from __future__ import annotations

from ...compiler.ir import Model
from ...compiler.lowering import Components, LoweringSpec
from ...compiler.lowering.module import SwiftLM
from ...compiler.lowering.attention import PerHeadAttention, StackedCacheAttention
from ...compiler.lowering.layers import Conv1x1, LNorm, ScaledNorm, rope_channels
from ...compiler.lowering.math import activation_spelled


def coreml_components(fp16: bool, ane: bool) -> Components:
    norm = ScaledNorm if fp16 else LNorm
    if ane:
        return Components(norm=norm, rope=rope_channels, projection=Conv1x1, activation=activation_spelled,
                          attention=PerHeadAttention())
    return Components(norm=norm, activation=activation_spelled, attention=StackedCacheAttention())


def coreml_module(model: Model, stateful: bool, fp16: bool = False, ane: bool = False) -> SwiftLM:
    """forward(inputIds[1, T] int32, causalMask[1, 1, T, E]) -> logits[1, T, vocab], start = E - T;
    stateful: caches are buffers keyCache/valueCache [layers, kvh, L, hd] (BHSD) or [layers, L,
    kvh, hd] (BSHD); else two more inputs, returned updated after logits. Core ML converts fp32
    graphs (fp16 is its compute precision)."""
    spec = LoweringSpec(interface="swift", kv="buffers" if stateful else "io",
                        components=coreml_components(fp16, ane))
    return SwiftLM(model, spec)
