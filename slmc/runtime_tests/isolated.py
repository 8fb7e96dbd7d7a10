"""Block-isolated check (`slmc diff ARTIFACT --isolated`, `slmc validate OUT --by-block`): does
each block of the artifact compute what the reference's block computes ON THE SAME INPUT?

Why: under int8 dynamic activations a model like SmolLM2 is chaotic end to end. A 1e-7 nudge of
the reference's own embeddings moves the logits as far as the artifact does, so the end-to-end
verdicts (validate's statistics, diff's per-stage stream) are honestly INCONCLUSIVE. Here errors
do not compound: for every block d the reference's block d (compiler/reference.py `block`) is fed
the ARTIFACT's own input to that block, taken from its debug variant's hidden states
(`Target.hidden_states`, as `slmc diff` reads them, or the same debug program run on a device),
and its output is compared with the artifact's own output of that block.

Metric, per block: the relative error of the block's UPDATE, ‖art_out − ref_out‖ / ‖ref_out − art_in‖
(the residual skip would hide an error of the update if the stream's norm were the yardstick);
also max |Δ| and the cosine of the two updates. The embedding (‖Δ‖ / ‖ref‖ of the gathered rows),
the final norm (rms_norm of the artifact's last state) and the logits (the head applied to the
artifact's last state) are compared by ‖Δ‖ / ‖ref‖: they have no skip.

Bounds, fixed here before any real model was measured, from each scheme's arithmetic:
  float32 compute                 1e-4  diff.py's float32 argument applied to one block: kernel
                                        summation order moves a block by ~1e-6, 100x margin.
  float16 compute (Core ML fp16)  2e-2  diff.py's per-block fp16 argument (~40 roundings of 4.9e-4).
  int8 dynamic activations        1e-2  derivation:
    - the artifact's and the reference's block get identical inputs, so the rows reaching a
      quantizer differ by float32 roundoff of the ops before it: relative ε <= ~1e-5;
    - a code can differ only where a value lies within ε·|x| of a rounding boundary (the scale,
      max/127, moves by ε too): at most 2·127·ε ≈ 0.25 % of the codes, each by one step;
    - one step is max/127 <= 6/127 = 4.7e-2 of the row RMS for a row whose max is <= 6x its
      RMS, so the quantized row moves by at most sqrt(0.0025)·0.047 ≈ 2.4e-3 of its RMS;
      (counting per element, P(flip) = ε|x_i|/step, the same sum gives sqrt(ε·(max/RMS)/127·
      mean|x|/RMS) ≈ 6e-4, and for any row sqrt(ε·sqrt(width)/127) <= 2.5e-3 up to width 1536,
      so the 2.4e-3 holds without the 6x assumption for SmolLM2-sized widths);
    - about four quantizers deep per block (q/k/v input, o input, gate/up input, down input),
      added in quadrature: sqrt(4)·2.4e-3 ≈ 5e-3; bound 1e-2, a 2x margin.
    Where the derivation is weakest (stated, not tuned): a code that does flip at the first
    quantizer reaches the next ones as a dense input difference larger than 1e-5, and each
    quantizer turns an input difference ε into ~sqrt(0.04·ε) (it only flips codes): in the
    worst case that chain nears the size of removing the quantizers altogether (rounding noise
    of one int8 step, (6/127)/sqrt(12) ≈ 1.4e-2 per quantizer). The noise floor below measures
    whether a rounding-size nudge of a block's input already sets that chain off.
  the reference executor itself   0
Quantized weights add nothing: every target stores slmc's codes unchanged (readback).

Noise floor, per stage: the reference's own stage fed its input nudged by bounds.NUDGE (the
relative nudge validate and diff use), compared with the un-nudged input's output by the same
metric. A stage past the bound whose floor is past it too cannot be told from rounding noise:
INCONCLUSIVE (diff's rule). Any stage past the bound with its floor within: FAIL.

What a PASS proves, and what it does not: every block, the final norm and the head compute what
the reference's compute on the same input, to within the scheme's rounding. It does not judge
the end-to-end chaos of int8 activations (how far rounding differences carry over 30 blocks):
that stays with validate's end-to-end verdict, which is reported beside it, INCONCLUSIVE or not.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from ..compiler import reference
from ..compiler.ir import Model
from ..errors import SlmcError
from ..targets.bounds import NUDGE, weight_kind

ISO_FLOAT32, ISO_FLOAT16, ISO_ACT8 = 1e-4, 2e-2, 1e-2

WHAT = ("block-isolated verdict: each block (and the final norm and the head) is fed the artifact's own "
        "input to it and must compute what the reference's does on that input, within the scheme's rounding; "
        "the end-to-end effect of int8 activations over all blocks (chaotic rounding) is not judged here")


@dataclass
class IsolatedReport:
    artifact: str
    runtime: str  # where the artifact's states were computed ("executorch on qemu-arm64 ...")
    how: str
    prompt_tokens: int
    bound: float
    bound_why: str
    stages: list[dict]  # stage, rel (update / output relative), max_abs, cosine, floor, within
    first_past: str | None
    verdict: str  # PASS, FAIL, INCONCLUSIVE
    passed: bool
    seconds: float
    what: str = WHAT
    notes: list[str] = field(default_factory=list)
    artifact_check: dict | None = None  # the debug variant's last logits row vs the artifact's own
    host_vs_device: dict | None = None  # the same debug program's states on this host vs the device
    end_to_end: dict | None = None  # the last recorded end-to-end validation (verdict, where, reasons)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def isolated_bound(manifest: dict) -> tuple[float, str]:
    """The fixed bound of one stage's isolated relative error for this artifact's flow."""
    if weight_kind(manifest) == "quant-act8":
        return ISO_ACT8, ("int8 dynamic activations: <= 0.25 % of codes one step apart per quantizer "
                          "(2.4e-3), four quantizers per block (5e-3), 2x margin")
    spec = manifest.get("spec") or {}
    if manifest.get("precision") == "fp16" or spec.get("precision") == "fp16":
        return ISO_FLOAT16, "float16 compute: ~40 roundings of 4.9e-4 per block"
    return ISO_FLOAT32, "float32 compute: kernel summation order only, per block"


def stage_names(model: Model) -> list[str]:
    return ["embedding", *(f"block {d}" for d in range(model.n_layers)), "final norm", "logits"]


def _metrics(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None) -> dict:
    """out vs ref, relative to ‖ref − base‖ (a block's update) or to ‖ref‖ (base None)."""
    out, ref = out.double().flatten(), ref.double().flatten()
    d = out - ref
    yard = ref - base.double().flatten() if base is not None else ref
    got = out - base.double().flatten() if base is not None else out
    return {"rel": float(d.norm() / yard.norm().clamp_min(1e-30)), "max_abs": float(d.abs().max()),
            "cosine": float(got @ yard / (got.norm() * yard.norm()).clamp_min(1e-30))}


def _stages(model: Model, ids: list[int]):
    """Per stage: (name, input index into the states (None: the ids), function of that input,
    whether the stage has a skip connection)."""
    positions = torch.arange(len(ids))
    L = model.n_layers
    out = [("embedding", None, lambda _: reference.embed(model, torch.tensor([ids]))[0], False)]
    for d in range(L):
        out.append((f"block {d}", d, lambda x, d=d: reference.block(
            model.block_at(d), x[None], positions, model.kv.dtype, model.kv.ring)[0], True))
    out.append(("final norm", L, lambda x: reference.rms_norm(x, model.final_norm), False))
    out.append(("logits", L, lambda x: reference.head(model, x[None])[0], False))
    return out


@torch.no_grad()
def judge(model: Model, ids: list[int], states: torch.Tensor, logits: torch.Tensor, bound: float, why: str,
          artifact: str = "", runtime: str = "", how: str = "", artifact_check: dict | None = None,
          t0: float | None = None) -> IsolatedReport:
    """states: the artifact's [depths + 2, T, hidden] (embedding, after each depth, final norm),
    logits [T, vocab]. The one verdict for host and device alike."""
    t0 = time.time() if t0 is None else t0
    L = model.n_layers
    states, logits = torch.as_tensor(states).float(), torch.as_tensor(logits).float()
    if states.shape[0] != L + 2 or states.shape[1] != len(ids) or logits.shape[0] != len(ids):
        raise SlmcError(f"the artifact's states {list(states.shape)} / logits {list(logits.shape)} do not fit "
                         f"{L} blocks and {len(ids)} prompt tokens", artifact or "isolated check")
    outs = list(states) + [logits]  # stage i's artifact output
    rows, first, fails, unsure = [], None, [], []
    for i, (name, src, f, skip) in enumerate(_stages(model, ids)):
        x = states[src] if src is not None else None
        ref = f(x)
        m = _metrics(outs[i], ref, x if skip else None)
        if src is None:  # the embedding has no input to nudge: the nudge of its own output
            floor = _metrics(reference._nudged(ref, NUDGE), ref, None)["rel"]
        else:
            floor = _metrics(f(reference._nudged(x, NUDGE)), ref, x if skip else None)["rel"]
        m.update(stage=name, floor=floor, within=m["rel"] <= bound)
        rows.append(m)
        if not m["within"]:
            first = first or name
            (unsure if floor > bound else fails).append(name)
    notes, checks_ok = [], artifact_check is None or artifact_check["matches"]
    if not checks_ok:
        notes.append(f"the debug variant does not reproduce the artifact's own logits (relative RMS "
                     f"{artifact_check['rel_rms']:.3g} > {artifact_check['bound']:.3g}): it was not compiled "
                     "from this IR, so its blocks say nothing about the artifact")
    if unsure:
        notes.append(f"past the bound where the reference's own stage moves past it under a {NUDGE:g} nudge of "
                     f"its input (noise floor): {', '.join(unsure)}; the bound cannot tell those from rounding noise")
    verdict = "FAIL" if fails or not checks_ok else "INCONCLUSIVE" if unsure else "PASS"
    return IsolatedReport(artifact, runtime, how, len(ids), bound, why, rows, first, verdict, verdict == "PASS",
                          round(time.time() - t0, 2), notes=notes, artifact_check=artifact_check)


def reasons(r: IsolatedReport) -> list[str]:
    """One line per stage past the bound (FAIL / INCONCLUSIVE), for a report's reasons."""
    return [f"{s['stage']}: isolated rel {s['rel']:.3g} > {r.bound:.3g} (noise floor {s['floor']:.3g})"
            for s in r.stages if not s["within"]]


def states_delta(a: torch.Tensor, b: torch.Tensor, names: list[str]) -> dict:
    """Per stage max |Δ| and relative RMS of two runs' states + logits (host vs device)."""
    rows = []
    for name, x, y in zip(names, a, b):
        x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
        rows.append({"stage": name, "max_abs": float((x - y).abs().max()),
                     "rel_rms": float((x - y).norm() / y.norm().clamp_min(1e-30))})
    return {"stages": rows, "max_abs": max(r["max_abs"] for r in rows),
            "max_rel_rms": max(r["rel_rms"] for r in rows)}
