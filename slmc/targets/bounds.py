"""Acceptance bounds: how far an artifact's logits may be from the reference's.

Each target owns its table (`Target.tolerances`), keyed by (backend, weight kind); the
kinds are "float", "quant" (quantized weights, float activations) and "quant-act8" (int8
dynamic activations). `runtime_tests/validate.py` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    max_abs: float  # on logits
    min_top1: float  # fraction of teacher-forced steps whose argmax agrees
    greedy_equal: bool  # free-running tokens must equal the reference's
    # int8 dynamic activations round at .5 boundaries, so float-rounding noise flips codes and
    # the flips compound over layers: the bounds are at least twice what a 1e-7 relative nudge
    # of the reference's own embeddings does to its logits and to its top-1 disagreement
    # (measured per run: one nudge is one sample of that noise, not its worst case)
    noise_floor: bool = False


# fp32 differs from the reference only by kernel summation order.
FLOAT_EXACT = Tolerance(2e-3, 1.0, True)
# For a flow no target lists.
DEFAULT_TOLERANCE = Tolerance(5e-2, 0.97, False)


def weight_kind(manifest: dict) -> str:
    """"float", "quant" or "quant-act8", from the manifest's quantization summary."""
    q = manifest.get("quantization")
    if not q:
        return "float"
    return "quant-act8" if any("+act_int8" in k for k in q.get("schemes", {})) else "quant"
