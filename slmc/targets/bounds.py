"""Acceptance bounds: how far an artifact may be from the reference executor, per flow kind.

Each target owns its table (`Target.tolerances`), keyed by (backend or precision, weight kind);
the kinds are "float", "quant" (quantized weights, float activations) and "quant-act8" (int8
dynamic activations). `runtime_tests/validate.py` applies them; a flow no table lists has no
published bound and its verdict is INCONCLUSIVE.

The bounds are fixed here, from what each scheme must achieve. They are never derived from
the run being judged: the reference's own sensitivity (a 1e-7 nudge of its embeddings) is
measured as a diagnostic only, and where it exceeds a bound the verdict is INCONCLUSIVE.

Two kinds of rule:
- "exact": the artifact computes the reference's float math in fp32, so every compared logit
  row must be within `max_abs`, every top-1 must agree (a disagreement counts as a near tie
  only where the reference's own top-2 gap is within twice that row's |Δ|, itself within
  `max_abs`) and free-running greedy tokens must equal the reference's.
- "statistical": int8 dynamic activations or fp16 compute make single-logit checks meaningless
  (a code flipped at a .5 boundary, an fp16 rounding), so the artifact is judged over at least
  `min_positions` teacher-forced positions: mean KL(reference ‖ artifact) per position, top-1
  agreement, and Δ perplexity (artifact ppl / reference ppl − 1 on the same positions).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    rule: str  # "exact" or "statistical"
    max_abs: float | None = None  # exact: on every compared logit row
    min_top1: float = 1.0  # fraction of compared positions whose argmax agrees
    greedy_equal: bool = True  # free-running greedy tokens must equal the reference's
    max_kl: float | None = None  # statistical: mean KL(reference ‖ artifact), nats per position
    max_dppl: float | None = None  # statistical: |artifact ppl / reference ppl − 1|
    min_positions: int = 0  # statistical: fewer teacher-forced positions cannot PASS
    flow: str = ""  # the flow kind, as the README's table names it


# fp32 compute of the reference's own floats (float weights, or weight-only codes dequantized
# exactly): the only difference is kernel summation order, ~1e-6 relative on logits of size
# ~10; 2e-3 leaves three orders of headroom and is still far below any real break (a wrong
# RoPE frequency, a shifted cache row or a mis-scaled layer moves logits by > 1e-2).
FLOAT_EXACT = Tolerance("exact", max_abs=2e-3, min_top1=1.0, greedy_equal=True, flow="fp32 (float or weight-only)")

# 512 positions: the sampling spread of a mean over N positions shrinks as 1/sqrt(N); at 512
# the spread of Δppl for a KL-1e-4 artifact is sqrt(2 * 1e-4 / 512) ≈ 6e-4, a third of the
# Δppl bound below, and a 99 % top-1 bar allows 5 disagreements, not 0 of 32.
MIN_POSITIONS = 512

# int8 dynamic activations (XNNPACK's qd8 GEMMs, ExecuTorch 8da4w and LiteRT): the artifact runs
# the same weight codes and the same per-token activation quantizer as the reference's
# quantized IR, so the only difference is an activation that lands within fp32 summation-order
# error (~1e-6 relative) of a .5 rounding boundary and rounds the other way. Such flips are
# rare (~1e-6 * 255 ≈ 3e-4 of codes) and each moves one activation by one step (1/255 of its
# token's range): first order, a KL of ~1e-6. The bound gives 100x headroom for flips
# compounding downstream, and stays three orders below what the 4-bit scheme itself costs
# against fp32 (KL ~1e-1 on a 135M model) and one to two below a mis-scaled layer or dropped
# activation quantization. top-1 99 %: at KL 1e-4 the top-2 order flips only at near ties.
# Δppl 0.2 %: an unbiased noise moves perplexity by ~KL (1e-4) plus the sampling spread above.
ACT8_STATISTICAL = Tolerance("statistical", min_top1=0.99, greedy_equal=False, max_kl=1e-4, max_dppl=2e-3,
                             min_positions=MIN_POSITIONS, flow="int8 dynamic activations")

# fp16 compute (Core ML fp16): every op rounds to 2^-11 ≈ 4.9e-4 relative; ~10 roundings per
# layer over ~30 layers random-walk to ~sqrt(300) * 4.9e-4 ≈ 8.5e-3 relative on the logits,
# so KL ≈ ½ (8.5e-3)² Var_p(logits) ≈ 1e-4 for a peaked LM (Var_p ~ 3 nats²). The bound is 5x
# that estimate. Δppl 0.5 %: ~KL of bias plus a sampling spread sqrt(2 * 5e-4 / 512) ≈ 1.4e-3
# (3 sigma ≈ 0.4 %). top-1 99 %, as for int8 activations.
FP16_STATISTICAL = Tolerance("statistical", min_top1=0.99, greedy_equal=False, max_kl=5e-4, max_dppl=5e-3,
                             min_positions=MIN_POSITIONS, flow="fp16 compute")

# The reference's own sensitivity: a 1e-7 relative nudge of its embeddings, the size of fp32
# rounding (2^-24 ≈ 6e-8), run through the same positions. Measured, never used as a bound.
NUDGE = 1e-7


def weight_kind(manifest: dict) -> str:
    """"float", "quant" or "quant-act8", from the manifest's quantization summary."""
    q = manifest.get("quantization")
    if not q:
        return "float"
    return "quant-act8" if any("+act_int8" in k for k in q.get("schemes", {})) else "quant"
