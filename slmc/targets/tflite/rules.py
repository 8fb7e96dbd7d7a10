"""What LiteRT holds exactly (see targets/quant_rules.py); the codes are written by codes.py."""

from ..quant_rules import QuantRules, Rule

# LiteRT: slmc writes the codes into the flatbuffer itself (codes.py). Float
# activations: INT4/INT8 constants with float32 scales and integer zero points, dequantized
# before each FULLY_CONNECTED / EMBEDDING_LOOKUP (exact for any group size, but blockwise
# weights are re-dequantized on every call). int8 activations (act_bits=8): the codes are
# the FULLY_CONNECTED filter itself, per-axis int8 or BlockwiseQuantization int4 with fp16
# scale tensors, which XNNPACK runs in the same qd8 GEMMs as ExecuTorch's 8da4w/8da8w.
_NOTE = " (recipes int8da-int4w-g32, int4-g32-litert and int8-litert fit)"
LITERT = QuantRules(
    "LiteRT",
    linear=Rule(bits=(4, 8), act_bits=(0, 8), note=_NOTE),
    embedding=Rule(bits=(4, 8), note=_NOTE),
    linear_8da=Rule(bits=(4, 8), symmetric_only=True, act_bits=(8,), bf16_scales=True, per_channel_bits=(8,),
                    note=_NOTE),
)
