"""Compare an artifact, run in its own runtime, with the reference executor.

Two runs of the artifact:
1. teacher-forced windows (teacher.py): text the reference samples itself (or the user's
   `--text`), windows of up to the cache's length from position 0; every logit row of every
   window is compared (max |Δ|, top-1, KL(reference ‖ artifact), Δ perplexity). At least
   `positions` rows in all; `long` makes every window as long as the cache (max_len − 1), so
   the run passes every sliding window and ring-buffer wrap.
2. free-running greedy from a prompt: the artifact's tokens (and text) against the
   reference's greedy continuation, logits compared while the two agree.

For a quantized flow, the artifact's bytes must also hold the reference's codes and scales
unchanged (each target's readback): the statistical bounds' argument ("the artifact runs the
same codes as the reference") is checked, not assumed.

The verdict applies the flow's fixed bound (targets/bounds.py): PASS, FAIL, or INCONCLUSIVE
(no published bound for the flow; the reference's own sensitivity to a 1e-7 nudge already
exceeds a statistical bound; fewer positions than a statistical bound needs). Only PASS passes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..compiler import reference
from ..compiler.ir import Model
from ..errors import SlmcError
from ..targets import target_of
from ..targets.bounds import MIN_POSITIONS, NUDGE, Tolerance, weight_kind
from .sessions import open_session
from .teacher import compare_windows, sample_windows, text_windows

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time,"
SAMPLE_SEED = 0


def tolerance_for(manifest: dict) -> Tolerance | None:
    """The bound the target that wrote the artifact fixes for its flow (targets/bounds.py)."""
    return target_of(manifest).tolerance(manifest)


@dataclass
class Report:
    artifact: str
    runtime: str
    prompt_tokens: int
    decode_steps: int
    prefill_max_abs: float  # every teacher-forced row, and the greedy prompt's last row
    decode_max_abs: float  # free-running decode steps while the artifact's tokens equal the reference's
    top1_agreement: float  # over the teacher-forced rows (near ties counted agreeing under the exact rule)
    greedy_equal: bool
    reference_text: str
    artifact_text: str
    tolerance: dict
    passed: bool  # verdict == "PASS"
    seconds: float
    first_divergence: int | None = None
    notes: list[str] = field(default_factory=list)
    verdict: str = "FAIL"  # PASS, FAIL or INCONCLUSIVE
    reasons: list[str] = field(default_factory=list)  # why the verdict is what it is
    flow: str = ""  # target/backend, weight kind
    positions: int = 0  # teacher-forced rows compared
    windows: int = 0
    window_len: int = 0
    text_source: str = ""
    mean_kl: float = 0.0  # nats per position, KL(reference ‖ artifact)
    delta_ppl: float = 0.0  # artifact ppl / reference ppl − 1 on the same positions
    reference_ppl: float = 0.0
    artifact_ppl: float = 0.0
    noise_floor: dict | None = None  # the nudged reference against the reference (diagnostic)
    host_vs_device: dict | None = None  # `--on DEVICE`: the same windows through this host's runtime

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def load_tokenizer(folder: Path):
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def prompt_ids(folder: Path, model: Model, prompt: str | None) -> tuple[list[int], object]:
    tok = load_tokenizer(folder)
    if tok is None:  # no tokenizer (tiny test models): a fixed pseudo-random prompt
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, model.vocab_size, (12,), generator=g).tolist(), None
    # No BOS: the stock runner adds one only when asked (num_bos), so neither do we.
    return tok.encode(prompt or DEFAULT_PROMPT, add_special_tokens=False).ids, tok


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False) if tok is not None else " ".join(map(str, ids))


def greedy_diffs(ref_tokens: list[int], ref_logits, out: list[int], out_logits) -> list[float]:
    """Max |Δ| of each free-running step's logits while the artifact's tokens equal the
    reference's (the same context so far: the same logits are due)."""
    diffs = []
    for i, (r, a) in enumerate(zip(ref_logits, out_logits)):
        if list(out[:i]) != list(ref_tokens[:i]):
            break
        diffs.append(float((torch.as_tensor(a).float() - r.float()).abs().max()))
    return diffs


def _greedy(session, ids: list[int], steps: int) -> tuple[list[int], list]:
    """The artifact's free-running greedy tokens and each step's logits."""
    session.reset()
    out, logits_seen = [], []
    logits = session.step(ids, 0)
    for i in range(steps):
        logits_seen.append(logits)
        out.append(int(logits.argmax()))
        if i + 1 < steps:
            logits = session.step([out[-1]], len(ids) + i)
    return out, logits_seen


def _text(folder: Path, model: Model, tok, seed_ids, text: Path | None, n: int, length: int):
    if text is None:
        return sample_windows(model, seed_ids, n, length, SAMPLE_SEED), \
            f"sampled by the reference (temperature 1, seed {SAMPLE_SEED})"
    if tok is None:
        raise SlmcError("--text needs the artifact's tokenizer.json, and there is none", str(folder))
    from ..compiler.textdata import read_text

    ids = tok.encode(read_text(text), add_special_tokens=False).ids
    windows = text_windows(ids, n, length)
    if not windows:
        raise SlmcError(f"the text has {len(ids)} tokens; validation needs at least 2", str(text))
    return windows, f"{text} ({len(ids)} tokens)"


def codes_check(folder: Path, manifest: dict, model: Model) -> tuple[list[str], list[str]]:
    """(fail reasons, notes): a quantized artifact must hold the reference's codes and scales."""
    if weight_kind(manifest) == "float":
        return [], []
    if manifest.get("format") == "pte-moe":
        return [], ["codes not read back: the offload format keeps each expert in its own program"]
    rb = target_of(manifest).readback(model, Path(folder) / manifest["artifact"])
    if rb.missing:
        return [f"{len(rb.missing)} of {rb.checked} quantized weights are not stored as the reference's codes and "
                f"scales (first: {rb.missing[0]})"], []
    if not rb.checked:
        return [], ["the reference has no quantized weight to read back"]
    return [], [f"all {rb.checked} quantized weights hold the reference's codes and scales (read back)"]


def verdict_of(tol: Tolerance | None, flow: str, art, noise, greedy_equal: bool, max_abs: float,
               hard_fails: list[str] = ()) -> tuple[str, list[str]]:
    """The verdict under the flow's fixed bound: the one implementation, for this host's run and
    for a device's (device/validate.py). hard_fails: a wrong weight, a runtime's own failed check."""
    if hard_fails:  # a FAIL whatever the bound
        return "FAIL", list(hard_fails)
    if tol is None:
        return "INCONCLUSIVE", [f"no published acceptance bound for the flow {flow}: nothing to judge it by"]
    fails = []
    if tol.max_abs is not None and max_abs > tol.max_abs:
        fails.append(f"max |Δ| {max_abs:.3g} > {tol.max_abs:g}")
    if art.top1 < tol.min_top1:
        fails.append(f"top-1 {art.top1:.1%} < {tol.min_top1:.1%}")
    if tol.max_kl is not None and art.mean_kl > tol.max_kl:
        fails.append(f"mean KL {art.mean_kl:.3g} > {tol.max_kl:g} nats")
    if tol.max_dppl is not None and abs(art.delta_ppl) > tol.max_dppl:
        fails.append(f"|Δppl| {abs(art.delta_ppl):.3%} > {tol.max_dppl:.2%}")
    if tol.greedy_equal and not greedy_equal:
        fails.append("greedy tokens differ from the reference's")
    if noise is not None:  # the reference's own sensitivity against the same bounds
        noisy = []
        if tol.max_kl is not None and noise.mean_kl > tol.max_kl:
            noisy.append(f"mean KL {noise.mean_kl:.3g} > {tol.max_kl:g}")
        if noise.top1 < tol.min_top1:
            noisy.append(f"top-1 {noise.top1:.1%} < {tol.min_top1:.1%}")
        if tol.max_dppl is not None and abs(noise.delta_ppl) > tol.max_dppl:
            noisy.append(f"|Δppl| {abs(noise.delta_ppl):.3%} > {tol.max_dppl:.2%}")
        if noisy:
            return "INCONCLUSIVE", [
                f"the reference's own noise floor exceeds the fixed bound: a {NUDGE:g} relative nudge of its "
                f"embeddings gives {', '.join(noisy)}, so the bound cannot tell this artifact from rounding noise "
                f"(artifact: {'; '.join(fails) if fails else 'within every bound'})"]
    if fails:
        return "FAIL", fails
    if art.rows < tol.min_positions:
        return "INCONCLUSIVE", [f"within every bound, but over {art.rows} positions; a statistical PASS needs "
                                f"at least {tol.min_positions} (--positions)"]
    return "PASS", ["within every bound"]


_judge = verdict_of  # the name tests/test_validate.py calls it by


@dataclass
class Plan:
    """What a validation runs: the greedy prompt and steps, the teacher-forced windows."""
    tol: Tolerance | None
    flow: str
    ids: list[int]  # the free-running greedy prompt
    tok: object
    steps: int
    windows: list[list[int]]
    source: str
    notes: list[str]

    @property
    def statistical(self) -> bool:
        return self.tol is not None and self.tol.rule == "statistical"

    @property
    def exact_max_abs(self) -> float | None:
        return self.tol.max_abs if self.tol is not None and self.tol.rule == "exact" else None


def plan(folder: Path, manifest: dict, model: Model, steps: int = 32, prompt: str | None = None,
         tolerance: Tolerance | None = None, positions: int = MIN_POSITIONS, long: bool = False,
         text: Path | None = None) -> Plan:
    """The prompt, steps and windows `validate` runs, here or on a device (the same choice)."""
    tol = tolerance or tolerance_for(manifest)
    flow = f"{manifest.get('target')}/{manifest.get('backend')}, {weight_kind(manifest)}"
    ids, tok = prompt_ids(folder, model, prompt)
    notes = []
    room = model.kv.max_len - 1  # the exported length axis tops out at max_len - 1
    if len(ids) > room // 2:
        notes.append(f"prompt cut from {len(ids)} to {room // 2} tokens to fit max_len={model.kv.max_len}")
        ids = ids[: room // 2]
    if steps > room - len(ids):
        notes.append(f"decode steps cut from {steps} to {room - len(ids)} to fit the KV cache")
        steps = room - len(ids)
    length = room if long else min(room, max(positions, 2))
    n = math.ceil(max(positions, room if long else 0) / length)
    windows, source = _text(folder, model, tok, ids, text, n, length)
    return Plan(tol, flow, ids, tok, steps, windows, source, notes)


def conclude(folder: Path, manifest: dict, model: Model, p: Plan, runtime: str, art, noise, out: list[int],
             out_logits, t0: float, notes: list[str] = (), hard_fails: list[str] = (),
             host_vs_device: dict | None = None) -> Report:
    """The report of a run of `p` (teacher-forced agreement `art`, the artifact's free-running
    tokens `out` and their logits), judged by verdict_of against the reference."""
    notes = list(p.notes) + list(notes)
    if art.ties:
        notes.append(f"{art.ties} of {art.rows} positions were near ties (the reference's top-2 gap within twice "
                     "the row's logit error, itself within the bound); counted as agreeing")
    ref_tokens, ref_logits = reference.greedy(model, p.ids, p.steps)
    diffs = greedy_diffs(ref_tokens, ref_logits, out, out_logits)
    equal = list(out) == list(ref_tokens)
    prefill = max(art.max_abs, diffs[0] if diffs else 0.0)
    decode = max(diffs[1:], default=0.0)
    code_fails, code_notes = codes_check(folder, manifest, model)
    notes += code_notes
    verdict, reasons = verdict_of(p.tol, p.flow, art, noise, equal, max(prefill, decode),
                                  list(code_fails) + list(hard_fails))
    tol = p.tol
    return Report(
        artifact=str(folder), runtime=runtime, prompt_tokens=len(p.ids),
        decode_steps=p.steps, prefill_max_abs=prefill, decode_max_abs=decode, top1_agreement=art.top1,
        greedy_equal=equal, reference_text=_decode(p.tok, ref_tokens), artifact_text=_decode(p.tok, out),
        tolerance=asdict(tol) if tol else {}, passed=verdict == "PASS", seconds=round(time.time() - t0, 2),
        first_divergence=next((i for i, (a, b) in enumerate(zip(out, ref_tokens)) if a != b), None),
        notes=notes, verdict=verdict, reasons=reasons, flow=p.flow, positions=art.rows, windows=len(p.windows),
        window_len=max(map(len, p.windows)), text_source=p.source, mean_kl=art.mean_kl, delta_ppl=art.delta_ppl,
        reference_ppl=art.ref_ppl, artifact_ppl=art.sub_ppl,
        noise_floor={**noise.summary(), "nudge": NUDGE} if noise is not None else None,
        host_vs_device=host_vs_device)


def validate(folder: Path, manifest: dict, model: Model, steps: int = 32, prompt: str | None = None,
             tolerance: Tolerance | None = None, positions: int = MIN_POSITIONS, long: bool = False,
             text: Path | None = None) -> Report:
    t0 = time.time()
    p = plan(folder, manifest, model, steps, prompt, tolerance, positions, long, text)
    session = open_session(folder, manifest)
    art, noise = compare_windows(model, session, p.windows, p.exact_max_abs, NUDGE if p.statistical else None)
    out, out_logits = _greedy(session, p.ids, p.steps)
    return conclude(folder, manifest, model, p, getattr(session, "runtime", "?"), art, noise, out, out_logits, t0)
