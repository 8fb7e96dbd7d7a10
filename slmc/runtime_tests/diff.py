"""Layer-by-layer comparison (`slmc diff`): where along the decoder two computations of one
prompt part ways.

A *side* is one computation of the prompt's hidden states (compiler/reference.py
`hidden_states` for an IR; a target's debug variant for an artifact, `Target.hidden_states`).
Two sides are compared stage by stage: the embedding output, the residual stream after every
block, the final norm's output and the logits, each over every prompt position, by max |Δ|,
relative RMS (‖a − b‖ / ‖b‖) and cosine. The first stage whose relative RMS exceeds the bound
is named.

The bound is fixed in advance, per side, from what its arithmetic must achieve against the IR
it was compiled from (never from the run):
  float32 compute                 1e-4  (kernel summation order: ~1e-6 per block, 100x margin)
  float16 compute (Core ML fp16)  2e-2  (unit roundoff 4.9e-4, ~40 rounded ops per block)
  int8 dynamic activations        5e-2  (the two quantizers may round a tie differently, one
                                         int8 step = row max / 127 per element; a row whose max
                                         is <= 6x its RMS: 6 / 127 = 4.7e-2 if every code differed)
  the reference executor itself   0
Two artifacts: the sum of their bounds (each is bounded against the same IR). Quantized weights
add nothing: every target stores slmc's codes unchanged (readback) and dequantizes them exactly.

fp32 IR vs quantized IR (the quantization mode) is not pass/fail; its bound says where
quantization error has grown past one rounding of the scheme: a b-bit uniform grid over a group
spanning +-3 sigma rounds with RMS 6 / (2^b - 1) / sqrt(12) of sigma (4 bits: 0.115, 8 bits:
0.0068), taken at the fewest bits any block weight has.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..compiler import reference
from ..compiler.ir import Model, QuantWeight, named_weights
from ..targets import target_of
from ..targets.bounds import NUDGE, weight_kind
from .sessions import open_session

REL_FLOAT32, REL_FLOAT16, REL_ACT8 = 1e-4, 2e-2, 5e-2


@dataclass
class Side:
    label: str
    kind: str  # "reference", "artifact"
    how: str
    runtime: str
    bound: float  # relative RMS this side may be from its IR
    why: str
    states: torch.Tensor = field(repr=False)  # [depths + 2, T, hidden]
    logits: torch.Tensor = field(repr=False)  # [T, vocab]
    manifest: dict | None = field(default=None, repr=False)
    # the debug variant's last logits row vs the artifact's own (artifact sides)
    artifact_check: dict | None = None


@dataclass
class DiffReport:
    a: str
    b: str
    mode: str  # "artifact-vs-reference", "artifact-vs-artifact", "float-vs-quantized"
    sides: list[dict]
    prompt_tokens: int
    bound: float
    bound_why: str
    stages: list[dict]
    first_past: str | None
    passed: bool
    seconds: float
    notes: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)  # float-vs-quantized: the passes applied
    verdict: str = ""  # PASS, FAIL or INCONCLUSIVE (judged modes); "" for float-vs-quantized
    # artifact-vs-reference: per stage, the rel RMS of the reference nudged by NUDGE vs itself
    noise_floor: list[float] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def artifact_bound(manifest: dict) -> tuple[float, str]:
    """The fixed relative-RMS bound of an artifact against the IR it was compiled from."""
    kind = weight_kind(manifest)
    if kind == "quant-act8":
        return REL_ACT8, "int8 dynamic activations: at most one int8 step per element (6/127)"
    fp16 = manifest.get("precision") == "fp16" or (manifest.get("spec") or {}).get("precision") == "fp16"
    if fp16:
        return REL_FLOAT16, "float16 compute: ~40 roundings of 4.9e-4 per block"
    return REL_FLOAT32, "float32 compute: kernel summation order only"


def scheme_bound(model: Model) -> tuple[float, str]:
    bits = [w.bits for n, w in named_weights(model) if isinstance(w, QuantWeight) and n.startswith("blocks.")]
    if not bits:
        return 0.0, "the model has no quantized block weights"
    b = min(bits)
    return 6 / (2 ** b - 1) / math.sqrt(12), f"one rounding of a {b}-bit grid over +-3 sigma: 6/(2^{b}-1)/sqrt(12)"


def stage_names(model: Model) -> list[str]:
    return ["embedding", *(f"block {d}" for d in range(model.n_layers)), "final norm", "logits"]


def reference_side(model: Model, ids: list[int], label: str = "reference") -> Side:
    states, logits = reference.hidden_states(model, ids)
    return Side(label, "reference", "slmc reference executor (plain torch, fp32)", "reference", 0.0,
                "the reference executor is the IR's meaning", states, logits)


def artifact_side(folder: Path, manifest: dict, model: Model, ids: list[int]) -> Side:
    """The artifact's target compiles a debug variant from `model` (the IR the artifact was made
    from) and runs it; its last logits row is checked against the artifact's own session."""
    inter = target_of(manifest, folder).hidden_states(model, manifest, ids)
    bound, why = artifact_bound(manifest)
    own = open_session(folder, manifest).step(list(ids), 0).float()
    dbg = inter.logits[-1].float()
    rel = float((own - dbg).norm() / dbg.norm().clamp_min(1e-30))
    check = {"max_abs": float((own - dbg).abs().max()), "rel_rms": rel, "bound": bound, "matches": rel <= bound,
             "what": "the debug variant's last logits row vs the artifact's own session on the same prompt"}
    return Side(str(folder), "artifact", inter.how, inter.runtime, bound, why, inter.states, inter.logits,
                manifest, check)


def noise_floor(model: Model, ids: list[int], base: Side) -> list[float]:
    """Per stage, how far the reference moves under a rounding-size (NUDGE) nudge of its
    embeddings: where that alone is past the bound, the bound cannot tell an artifact from
    rounding noise (a chaotic scheme, e.g. int8 activations over massive activations). Measured
    as a diagnostic; never used as a bound."""
    states, logits = reference.hidden_states(model, ids, NUDGE)
    return [compare(x, y)["rel_rms"] for x, y in zip(list(states) + [logits], list(base.states) + [base.logits])]


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().flatten(), b.double().flatten()
    d = a - b
    return {"max_abs": float(d.abs().max()), "rel_rms": float(d.norm() / b.norm().clamp_min(1e-30)),
            "cosine": float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))}


def diff_sides(a: Side, b: Side, names: list[str], mode: str, t0: float, bound: float | None = None,
               why: str | None = None, judged: bool = True, floor: list[float] | None = None) -> DiffReport:
    """b is the baseline (relative RMS is relative to b). floor: the reference's noise floor per
    stage (noise_floor); a stage past the bound whose floor is past it too is INCONCLUSIVE."""
    if bound is None:  # both sides are bounded against the same IR: the sum bounds their difference
        bound = a.bound + b.bound
        why = a.why if b.kind == "reference" else f"{a.why}; plus {b.why}"
    rows = list(a.states) + [a.logits]
    base = list(b.states) + [b.logits]
    if len(rows) != len(base) or len(names) != len(rows):
        raise ValueError(f"the two sides have {len(rows)} and {len(base)} stages; expected {len(names)}")
    stages, first = [], None
    for name, x, y in zip(names, rows, base):
        m = compare(x, y)
        m["within"] = m["rel_rms"] <= bound
        stages.append({"stage": name, **m})
        if first is None and not m["within"]:
            first = name
    notes = []
    checks_ok = True
    for s in (a, b):
        if s.artifact_check is not None and not s.artifact_check["matches"]:
            checks_ok = False
            notes.append(f"the debug variant of {s.label} does not reproduce the artifact's own logits "
                         f"(relative RMS {s.artifact_check['rel_rms']:.3g} > {s.artifact_check['bound']:.3g}): "
                         "the artifact was not compiled from this IR, so its blocks cannot be located")
    passed = first is None and checks_ok if judged else checks_ok
    verdict = ("PASS" if passed else "FAIL") if judged else ""
    if judged and checks_ok and first is not None and floor is not None:
        i = names.index(first)
        if floor[i] > bound:
            verdict = "INCONCLUSIVE"
            notes.append(f"the reference's own noise floor at {first} (a {NUDGE:g} relative nudge of its "
                         f"embeddings) is rel RMS {floor[i]:.3g}, past the bound {bound:.3g}: the bound cannot "
                         "tell this artifact from rounding noise there")
    side_info = [{"label": s.label, "kind": s.kind, "how": s.how, "runtime": s.runtime, "bound": s.bound,
                  "why": s.why, "artifact_check": s.artifact_check} for s in (a, b)]
    return DiffReport(a.label, b.label, mode, side_info, int(a.states.shape[1]), bound, why, stages, first,
                      passed, round(time.time() - t0, 2), notes, verdict=verdict, noise_floor=floor)
