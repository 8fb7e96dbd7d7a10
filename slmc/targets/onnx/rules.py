"""What ONNX Runtime holds exactly (see targets/quant_rules.py); the codes are written by codes.py.

Linears (and a quantized head): com.microsoft MatMulNBits, 4- or 8-bit codes stored unsigned,
dequantized as (code - zero_point) * scale per block of `block_size` along K, zero point 2^(b-1)
when the input is absent. slmc's symmetric codes c go in as c + 2^(b-1) with no zero-point input,
asymmetric ones as they are with their integer zero points: the same (c - z) * s in fp32.
Embeddings: com.microsoft GatherBlockQuantized, the same storage and formula on gathered rows.

Both ops want a power-of-two block of at least 16 (MLAS has kernels for 16..256): a group of
g = b * r is stored as blocks of b with each group's scale (and zero point) repeated r times,
which dequantizes to the same values. Groups that no such b divides are refused.

int8 dynamic activations are refused: ONNX Runtime's only int8-activation path for MatMulNBits
(accuracy_level=4) quantizes A symmetrically per block of block_size along K, while slmc's
act_bits=8 (XNNPACK's 8da4w) is asymmetric per token over the whole row: a different
rounding, so neither slmc's reference nor ExecuTorch's numbers would be reproduced.
"""

from __future__ import annotations

from ...compiler.ir import Model, MoE, QuantWeight, named_weights
from ..quant_rules import QuantRules, Rule

MIN_BLOCK, MAX_BLOCK = 16, 256
_NOTE = " (recipe int4-g32-onnx fits: int4 g32 weights, int8 embedding, float activations)"
_ACT8 = ("ONNX Runtime's MatMulNBits quantizes activations only with accuracy_level=4, symmetric int8 per "
         "block of K, not slmc's asymmetric per-token int8 (XNNPACK 8da4w): quantize with act_bits=0")
ONNX_RT = QuantRules(
    "ONNX Runtime",
    linear=Rule(bits=(4, 8), act_bits=(0,), note=f"; {_ACT8}{_NOTE}"),
    embedding=Rule(bits=(4, 8), note=_NOTE),
)


def block_size(group: int) -> int | None:
    """The MatMulNBits/GatherBlockQuantized block for a group of `group` columns (None: none fits)."""
    b = min(group & -group, MAX_BLOCK)  # the largest power of two dividing the group, capped
    return b if b >= MIN_BLOCK else None


def layout_refusal(model: Model) -> str | None:
    """What ONNX_RT.check does not see: block sizes, zero-point range, MoE experts."""
    quant = [(p, w) for p, w in named_weights(model) if isinstance(w, QuantWeight)]
    if not quant:
        return None
    if any(isinstance(b.ffn, MoE) for b in model.blocks):
        return ("quantized weights in a mixture-of-experts model are not lowered for ONNX (the experts "
                "are one batched matmul, not one MatMul per linear); compile it in float")
    for path, w in quant:
        if block_size(w.group_size) is None:
            return (f"{path}: group size {w.group_size} is not a multiple of 16; MatMulNBits and "
                    f"GatherBlockQuantized store power-of-two blocks of 16..{MAX_BLOCK} (use group_size=16, 32, "
                    "64, 128 or 0)")
        if w.zeros is not None and (w.zeros.min() < 0 or w.zeros.max() > 2 ** w.bits - 1):
            return (f"{path}: zero points outside 0..{2 ** w.bits - 1}; MatMulNBits stores them as unsigned "
                    f"{w.bits}-bit integers (quantize with symmetric=true)")
    return None
