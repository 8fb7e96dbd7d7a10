"""What Core ML holds exactly (see targets/quant_rules.py)."""

from ..quant_rules import QuantRules, Rule

def coreml_rules(spec) -> QuantRules:
    """Core ML (iOS 18 constexpr_blockwise_shift_scale): int4/int8 codes with optional
    offsets. In fp16 precision the converter stores the scales as fp16, so they must be
    fp16 values already (quantize with scale_dtype=float16)."""
    fp16 = spec.precision == "fp16"
    note = " (Core ML computes in fp16 here; scale_dtype=float16 keeps scales exact)" if fp16 else ""
    rule = Rule(bits=(4, 8), scale_dtype="float16" if fp16 else None, note=note)
    return QuantRules("Core ML", linear=rule, embedding=rule)
