"""What ExecuTorch's XNNPACK backend holds exactly (see targets/quant_rules.py)."""

from ..quant_rules import QuantRules, Rule

# XNNPACK runs int4/int8 weights only in its dynamically quantized GEMMs (qd8-f32-qb4w,
# qd8-f32-qc8w), with blockwise scales kept as bf16; embeddings go to ExecuTorch's
# quantized_decomposed::embedding_4bit / embedding_byte kernels.
XNNPACK = QuantRules(
    "ExecuTorch/XNNPACK",
    linear=Rule(bits=(4, 8), symmetric_only=True, act_bits=(8,), bf16_scales=True, per_channel_bits=(8,),
                note=" (recipes int8da-int4w-g32 and int8da-int8w fit)"),
    embedding=Rule(bits=(4, 8)),
    tied_quantized_head=False,
)
