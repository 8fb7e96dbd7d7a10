"""Why data-free GPTQ was no better than RTN, and which data-free calibration fixes it
(issue 18, item 1): int4 g32 symmetric on SmolLM2-135M, evaluated on a novel the
calibration never saw.

    python bench/quant_calib.py                    # SmolLM2-135M-Instruct, ../shared/corpus
    python bench/quant_calib.py --quick            # tiny random Llama, smoke test
    python bench/quant_calib.py --only NAME,NAME --append

    flock /work/coord/heavy.lock nice -n 10 python bench/quant_calib.py --inproc --threads 2 --append

Every GPTQ factor changes one option against a baseline row: "gptq act-order" (BASE0, the
recipe's GPTQ before this study: 16 samples x 256 tokens sampled from the model at temperature 1,
each from a random vocabulary token, damping 0.01, act-order) for the clip search and damping,
and "gptq clip" (BASE, the clip search on: quant.gptq's default since it won) for the rest: Hessian damping, a Hessian-weighted clip search
for the group scales, temperature, the first token (random vs BOS), sample diversity (many
short samples), act-order off, the number of tokens. "combined" then joins the factors whose
measured rows beat the baseline, alone, under AWQ's scales (quant.awq:quantize=false, then
quant.gptq) and calibrated on Emma. References: fp32, RTN, AWQ data-free and calibrated.
The amount rows (AMOUNTS, SEEDS) then vary n_seqs x seq_len, and the seed, under the recipes'
method (AWQ scales + GPTQ clip, both passes on the same calibration), data-free and on Emma.
The method rows (bench/quant_calib_rows.py: METHODS) each change the method against a measured
row at its amount: GPTQ alone, quant.rotate before GPTQ, quant.gptq's options.
Evaluation: perplexity on the first --eval-tokens tokens of each evaluation text (Northanger
Abbey, the least famous corpus novel; more with --eval-text), non-overlapping --window
windows (stride = window: half the cost of bench/quant_rotate.py's stride window/2, so
absolute perplexities differ from that file's). Each variant runs in its own subprocess
with --threads torch threads, under `flock --lock` when given (the machine's heavy lock), or
all in this process with --inproc (the model loads once and equal data-free samples are drawn
once; wrap the whole command in flock). Writes bench/results/quant_calib{,-quick}.json after
every variant and renders the .md from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import CORPUS, RESULTS, render, tiny_model, write_results
from quant_calib_rows import method_table, method_variants

# the least famous corpus novel (fp32 perplexity 38.5, twice Pride and Prejudice's); one text keeps
# the study inside the machine's shared time (more with --eval-text)
EVAL_TEXTS = ("austen_northangerabbey.txt",)
CALIB_TEXT = "austen_emma.txt"
GOALS = (("calibrated", 5.0), ("data-free", 8.0))  # issue 18: int4 g32 sym, % perplexity over fp32
Q = "bits=4,group_size=32"
OLD = "n_seqs=16,seq_len=256"  # the defaults before this study, spelled out so they stay measured
ENDS = "embed_bits=8,head_bits=8,ends_group_size=0"


# The clip search became quant.gptq's default (20022e5) while this study ran, so both baselines are
# spelled out: BASE0 is the recipe before the study, BASE the default since (BASE0 + clip=true).
BASE0 = f"{OLD},act_order=true,clip=false"
BASE = f"{OLD},act_order=true,clip=true"
FACTORS = (  # (variant, what it tests, GPTQ options changed, the row it changes them against)
    ("gptq damp 0.1", "Hessian damping", "damp=0.1", "gptq act-order"),
    ("gptq clip", "scales by Hessian-weighted clip search", "clip=true", "gptq act-order"),
    ("gptq T 0.8", "temperature", "temperature=0.8", "gptq clip"),
    ("gptq first bos", "first token", "first=bos", "gptq clip"),
    ("gptq 64x64", "diversity (same tokens)", "n_seqs=64,seq_len=64", "gptq clip"),
    ("gptq 64x256", "number of tokens (4x)", "n_seqs=64,seq_len=256", "gptq clip"),
    ("gptq no act-order", "act-order (off)", "act_order=false", "gptq clip"),  # quant.md: off is 7 points worse
)
BASES = {"gptq act-order": BASE0, "gptq clip": BASE}
# The amount of calibration under the recipes' method (AWQ scales, then GPTQ with the clip search),
# both passes given the same n_seqs x seq_len; 16x256 (4096 tokens) is the passes' default.
AMOUNTS = (("data-free", ("64x256", "128x256")), ("calibrated", ("16x256", "64x256", "128x512", "256x512")))
# the same rows at another seed (other windows of the text, other samples): how far two seeds differ
SEEDS = (("calibrated", "16x256"), ("calibrated", "64x256"), ("calibrated", "128x512"), ("data-free", "64x256"))


def _opts(spec: str, quick: bool = False) -> dict[str, str]:
    d = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    if quick and "n_seqs" in d:  # the quick run keeps every sample tiny
        d.update(n_seqs=str(max(2, int(d["n_seqs"]) // 8)), seq_len="16")
    return d


def _spec(d: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in d.items())


WIN = 0.5  # points of mean Δppl a factor must gain to join "combined" (less is within sampling noise)


def combined(rows: list[dict]) -> tuple[str, list[str]]:
    """BASE with every single factor whose measured row beat the row it changes (its baseline) by
    WIN, the better one first where two set the same option; and the names of those factors."""
    base = next((r["perplexity"] for r in rows if r.get("variant") == "fp32" and "perplexity" in r), None)
    score = {r["variant"]: _mean(_deltas(r, base)) for r in rows if base and _deltas(r, base)}
    won = sorted((score[n], n, o) for n, _, o, against in FACTORS
                 if n in score and against in score and score[n] < score[against] - WIN)
    d, used = _opts(BASE), []
    set_keys: set[str] = set()
    for _, name, o in won:
        if not set_keys & _opts(o).keys() and name != "gptq clip":  # BASE holds the clip search
            d.update(_opts(o))
            set_keys |= _opts(o).keys()
            used.append(name)
    return _spec(d), ["gptq clip"] + used


def variants(calib: str, quick: bool, rows: list[dict] | None = None) -> list[tuple[str, str, str, list[str]]]:
    """(name, calibration kind, what it tests, passes). Every GPTQ factor changes one option
    against BASE (act-order on: quant.md measured it 7 points better); "combined" joins the
    factors that won in `rows` (the rows measured so far). Most telling first: a stopped run
    keeps its rows."""
    g = f"quant.gptq:{Q}"
    q = (lambda spec: _spec(_opts(spec, quick)))
    old, base = q(OLD), q(BASE)
    best_spec, used = combined(rows or [])
    best = q(best_spec)
    what = "combination: " + (" + ".join(used) if used else "no factor has beaten the baseline yet")
    factor = {n: (n, "data-free", t, [f"{g},{_spec({**_opts(q(BASES[against])), **_opts(o, quick)})}"])
              for n, t, o, against in FACTORS}
    return [
        ("fp32", "-", "reference", []),
        ("gptq act-order", "data-free", "baseline (recipe before)", [f"{g},{q(BASE0)}"]),
        factor["gptq clip"], factor["gptq damp 0.1"],  # the same samples as the baseline: no new sampling
        ("awq", "data-free", "reference (recipes' method before)", [f"quant.awq:{Q},{old}"]),
        ("gptq combined", "data-free", what, [f"{g},{best}"]),
        ("awq-scales+gptq combined", "data-free", "AWQ scales under GPTQ (" + what + ")",
         [f"quant.awq:{Q},quantize=false,{old}", f"{g},{best}"]),
        ("gptq calibrated combined", "calibrated", what + ", calibrated", [f"{g},{best},calib={calib}"]),
        factor["gptq T 0.8"], factor["gptq first bos"], factor["gptq 64x64"],
        ("awq-scales+gptq calibrated combined", "calibrated", "AWQ scales under GPTQ, calibrated",
         [f"quant.awq:{Q},quantize=false,{old},calib={calib}", f"{g},{best},calib={calib}"]),
        ("gptq calibrated", "calibrated", "reference", [f"{g},{base},calib={calib}"]),
        ("awq calibrated", "calibrated", "reference", [f"quant.awq:{Q},{old},calib={calib}"]),
        factor["gptq 64x256"], factor["gptq no act-order"],
        ("gptq combined + int8 ends", "data-free", "embedding and head int8 per row", [f"{g},{best},{ENDS}"]),
        ("rtn", "data-free", "reference", [f"quant.rtn:{Q}"]),
        ("awq-scales+gptq clip", "data-free", "AWQ scales under GPTQ (clip)", awq_gptq(OLD, "", quick)),
        # measured with the interrupted run's combination; first=bos and temperature do not act on text
        ("awq-scales+gptq calibrated 64x64", "calibrated", "AWQ scales under GPTQ (clip), calibrated in 64 "
         "windows of 64 tokens (the interrupted run's combination; first=bos and temperature do not act on "
         "calibration text)", [f"quant.awq:{Q},quantize=false,{old},calib={calib}",
                               f"{g},{q('n_seqs=64,seq_len=64')},act_order=true,first=bos,clip=true,"
                               f"temperature=0.8,calib={calib}"]),
    ] + amount_variants(calib, quick) + method_variants(calib, q)


def awq_gptq(amount: str, calib: str, quick: bool) -> list[str]:
    """The recipes' int4 method: AWQ scales (quantize=false), then GPTQ with the clip search, both
    on the same calibration (calib: a text file, or empty for data-free samples)."""
    a = _spec(_opts(amount, quick)) + (f",calib={calib}" if calib else "")
    return [f"quant.awq:{Q},quantize=false,{a}", f"quant.gptq:{Q},{a},act_order=true,clip=true"]


def _tokens(size: str) -> str:
    n, L = map(int, size.split("x"))
    return f"{n * L // 1024}k" if n * L >= 8192 else str(n * L)


def amount_name(kind: str, size: str, seed: int = 0) -> str:
    name = f"awq-scales+gptq {'calibrated' if kind == 'calibrated' else 'clip'} {size}"
    return name + (f" seed {seed}" if seed else "")


def amount_variants(calib: str, quick: bool) -> list[tuple[str, str, str, list[str]]]:
    """One factor: the amount of calibration under AWQ scales + GPTQ clip (both passes alike);
    then a few of those rows again at seed 1."""
    out = []
    for kind, size, seed in ([(k, z, 0) for k, sizes in AMOUNTS for z in sizes] + [(k, z, 1) for k, z in SEEDS]):
        n, L = size.split("x")
        name = amount_name(kind, size, seed)
        against = "awq-scales+gptq clip" if kind == "data-free" else amount_name(kind, "16x256")
        what = (f"calibration amount: {n} x {L} = {_tokens(size)} tokens in both passes"
                + (" (like-for-like baseline: the passes' default amount)" if name == against
                   else f", against {against}"))
        if seed:
            against = amount_name(kind, size)
            what = f"calibration seed (other {'windows of the text' if kind == 'calibrated' else 'samples'}): " \
                   f"seed {seed}, against {against} (seed 0)"
        spec = f"n_seqs={n},seq_len={L}" + (f",seed={seed}" if seed else "")
        out.append((name, kind, what, awq_gptq(spec, calib if kind == "calibrated" else "", quick)))
    return out


def worker(a, model=None, ids=None) -> dict:
    """One variant: passes, then perplexity on each evaluation text. In-process runs hand
    over the loaded fp32 model (copied here) and the evaluation token ids."""
    import copy

    import torch

    from slmc import api

    torch.set_num_threads(a.threads)
    inproc = model is not None
    model = copy.deepcopy(model) if inproc else api.load(a.model)
    t0 = time.time()
    model, logs = api.run_passes(model, a.passes)
    seconds = time.time() - t0
    ids = ids if ids is not None else eval_ids(a, model)
    ppl = {}
    for text, t in ids.items():
        ppl[text] = api.evaluate_tokens(t, model, a.name, None, window=a.window, stride=a.window).perplexity
    calib = [l.info.get("calibration") for l in logs if l.info.get("calibration")]
    calib_s = [l.info["calibration_seconds"] for l in logs if "calibration_seconds" in l.info]
    return {"variant": a.name, "passes": a.passes, "pass_seconds": round(seconds, 1),
            "weight_bytes": api.weight_bytes(model), "perplexity": ppl, "calibration": calib,
            "calibration_seconds": calib_s,
            "wall_s": round(time.time() - t0, 1), "threads": a.threads, "inproc": inproc}


def eval_ids(a, model) -> dict[str, list[int]]:
    from slmc import api

    tok = api.tokenizer_dir(model.source.get("path")) / "tokenizer.json"
    return {Path(t).name: api.token_ids([t], tok, min_tokens=a.window)[:a.eval_tokens] for t in a.eval_texts}


def run_variant(name: str, passes: list[str], a, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--name", name, "--model", a.model,
           "--eval-tokens", str(a.eval_tokens), "--window", str(a.window), "--result", str(work / "row.json"),
           "--threads", str(a.threads)]
    cmd += sum((["--eval-text", t] for t in a.eval_texts), []) + sum((["--pass", p] for p in passes), [])
    if a.lock:
        cmd = ["flock", a.lock, "nice", "-n", "10"] + cmd
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1:] or [f"exit {p.returncode}"]
        return {"variant": name, "error": last[0][:300]}
    row = json.loads((work / "row.json").read_text())
    return {**row, "wall_s_with_lock_wait": round(time.perf_counter() - t0, 1)}


def run_inproc(name: str, passes: list[str], a, model, ids) -> dict:
    """One variant in this process; a failure becomes the row's error, as in run_variant."""
    from slmc.errors import SlmcError

    try:
        return worker(argparse.Namespace(**{**vars(a), "name": name, "passes": passes}), model, ids)
    except (SlmcError, RuntimeError, ValueError) as e:
        return {"variant": name, "error": f"{type(e).__name__}: {e}"[:300]}


def _deltas(r: dict, base: dict | None) -> dict[str, float] | None:
    if not base or "perplexity" not in r:
        return None
    return {t: 100 * (r["perplexity"][t] / base[t] - 1) for t in base if t in r["perplexity"]}


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def best_of(rows: list[dict], base: dict | None, kinds: tuple[str, ...], full_ends: bool = False):
    """The variant with the lowest mean Δppl among `kinds` (block linears only unless full_ends)."""
    cand = [(r["variant"], _mean(_deltas(r, base))) for r in rows
            if r.get("kind") in kinds and _deltas(r, base) and ("ends" in r["variant"]) == full_ends]
    return min(cand, key=lambda x: x[1]) if cand else None


def factor_table(rows: list[dict], base: dict | None) -> list[str]:
    """Each single factor's effect: its mean Δppl minus its own baseline row's, in points."""
    score = {r["variant"]: _mean(_deltas(r, base)) for r in rows if _deltas(r, base)}
    if "gptq act-order" not in score:
        return []
    out = ["", "Single factors, each against the row it changes (gptq act-order: the recipe before this study; "
           "gptq clip: the default since); negative is better:", "",
           "| factor | option | against | mean Δ | vs that row (points) |", "|---|---|---|---|---|"]
    for name, what, opt, against in FACTORS:
        if name in score and against in score:
            out.append(f"| {what} | `{opt}` | {against} | {score[name]:+.1f} % | {score[name] - score[against]:+.1f} |")
    ref = score["gptq act-order"]
    for name in ("awq", "gptq combined", "awq-scales+gptq clip", "awq-scales+gptq combined"):
        if name in score:
            out.append(f"| ({name}) | | gptq act-order | {score[name]:+.1f} % | {score[name] - ref:+.1f} |")
    return out


def amount_table(rows: list[dict], base: dict | None) -> list[str]:
    """The amount of calibration under AWQ scales + GPTQ clip: tokens, mean Δ, cost."""
    score = {r["variant"]: (r, _mean(_deltas(r, base))) for r in rows if _deltas(r, base)}
    names = [("awq-scales+gptq clip", "data-free", "16x256", 0)]
    names += [(amount_name(k, z), k, z, 0) for k, sizes in AMOUNTS for z in sizes]
    names += [(amount_name(k, z, 1), k, z, 1) for k, z in SEEDS]
    names.sort(key=lambda x: (x[1] != "calibrated", [int(v) for v in x[2].split("x")], x[3]))
    have = [x for x in names if x[0] in score]
    if not have:
        return []
    out = ["", "Amount of calibration under AWQ scales + GPTQ clip (both passes alike; goals: calibrated "
           f"≤ +{dict(GOALS)['calibrated']:.0f} %, data-free ≤ +{dict(GOALS)['data-free']:.0f} %):", "",
           "| calibration | n_seqs x seq_len | seed | tokens | mean Δ | pass s | calibration s (awq, gptq) |",
           "|---|---|---|---|---|---|---|"]
    notes = ["", "Pass s without a thread count: a run of all variants in one process, where data-free "
             "samples drawn by an earlier row were reused (their sampling is not in that row's time)."]
    for n, k, z, seed in have:
        r, d = score[n]
        thr = f" ({r['threads']} thr)" if "threads" in r else ""
        cs = ", ".join(f"{x:g}" for x in r.get("calibration_seconds", [])) or "-"
        out.append(f"| {k} | {z} | {seed} | {_tokens(z)} | {d:+.1f} % | {r['pass_seconds']}{thr} | {cs} |")
    return out + (notes if any("threads" not in score[x[0]][0] for x in have) else [])


def markdown(data: dict) -> str:
    rows, meta = data["rows"], data["meta"]
    texts = meta["eval_texts"]
    lines = [f"# Data-free calibration for int4 g32 GPTQ ({meta['model']})", "",
             f"{meta['date']}, {meta['machine']}. Calibrated rows: {meta['calibration']}. "
             f"Evaluation: {meta['evaluation']} (texts no calibration saw).", ""]
    if meta.get("machine_later"):
        lines += [f"Rows whose 'pass s' names a thread count ran later: {meta['machine_later']}; "
                  "the others on the machine above (times are not comparable across the two).", ""]
    if meta.get("reduced"):
        lines += [f"**Reduced configuration:** {meta['reduced']}", ""]
    if meta.get("correction"):
        lines += [f"**Correction:** {meta['correction']}", ""]
    head = " | ".join(f"ppl {t.removeprefix('austen_').removesuffix('.txt')} | Δ" for t in texts)
    lines += [f"| variant | calibration | tests | {head} | mean Δ | weights MiB | pass s |",
              "|---|---|---|" + "---|---|" * len(texts) + "---|---|---|"]
    base = next((r["perplexity"] for r in rows if r.get("variant") == "fp32" and "perplexity" in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r.get('kind', '')} | {r.get('tests', '')} | not run: {r['error']} |")
            continue
        d = _deltas(r, base) or {}
        cells = " | ".join(f"{r['perplexity'][t]:.2f} | " + (f"{d[t]:+.1f} %" if t in d else "-") for t in texts)
        mean = f"{_mean(d):+.1f} %" if d else "-"
        thr = f" ({r['threads']} thr)" if "threads" in r else ""
        lines.append(f"| {r['variant']} | {r.get('kind', '')} | {r.get('tests', '')} | {cells} | {mean} | "
                     f"{r['weight_bytes'] / 2**20:.1f} | {r['pass_seconds']}{thr} |")
    lines += ["", "Passes of each row:", ""]
    lines += [f"- {r['variant']}: `{' '.join(r.get('passes', [])) or '(none)'}`" for r in rows]
    lines += factor_table(rows, base)
    lines += amount_table(rows, base)
    lines += method_table({r["variant"]: (r, _mean(_deltas(r, base))) for r in rows if _deltas(r, base)})
    lines += ["", "Goals (issue 18, int4 g32 symmetric weight-only, mean Δppl over the evaluation texts; "
              "rows that also quantize the embedding/head are not counted): ≤ +5 % with the user's "
              "calibration text (calibrated rows), ≤ +8 % data-free.", "",
              "| goal | best measured | result | tried |", "|---|---|---|---|"]
    for kind, goal in GOALS:
        tried = [r["variant"] for r in rows if r.get("kind") == kind and _deltas(r, base)]
        b = best_of(rows, base, (kind,))
        lines.append(f"| ≤ +{goal:.0f} % ({kind}) | " + (f"{b[0]} {b[1]:+.1f} % | {'met' if b[1] <= goal else 'not met'}"
                                                         if b else "not measured | -") + f" | {', '.join(tried)} |")
    if not meta.get("complete", True):
        lines += ["", "**Partial run:** the rows above are all this run measured."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="only re-render results/quant_calib*.md")
    ap.add_argument("--name", default="")
    ap.add_argument("--pass", dest="passes", action="append", default=[])
    ap.add_argument("--model", default="default")
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--eval-text", dest="eval_texts", action="append", default=[])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--append", action="store_true", help="keep measured rows; run only missing/failed ones")
    ap.add_argument("--lock", default="", help="run each variant under `flock LOCK` (a machine-wide lock)")
    ap.add_argument("--reduced", default="", help="say in the results how this run is reduced")
    ap.add_argument("--inproc", action="store_true",
                    help="run the variants in this process: the model loads once, the evaluation text is "
                         "tokenized once and equal data-free samples are drawn once (wrap the command in flock)")
    a = ap.parse_args()
    if a.render:
        return render("quant_calib")
    if a.worker:
        Path(a.result).write_text(json.dumps(worker(a)))
        return
    corpus = Path(a.corpus)
    a.eval_texts = a.eval_texts or [str(corpus / t) for t in EVAL_TEXTS]
    calib = str(corpus / CALIB_TEXT)
    suffix = ""
    if a.quick:
        a.model = tiny_model(Path("/tmp"), "slmc-bench-quant-calib-tiny")
        a.eval_tokens, a.window, suffix = 600, 128, "-quick"
    meta = {"model": a.model if not a.quick else "tiny random Llama", "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores ({a.threads} torch threads, shared)"
                       + (", variants in one process" if a.inproc else ", each variant in its own process"),
            "calibration": f"{CALIB_TEXT} (the data-free rows sample from the model; sizes in the passes)",
            "eval_texts": [Path(t).name for t in a.eval_texts],
            "evaluation": f"{', '.join(Path(t).name for t in a.eval_texts)}: first {a.eval_tokens} tokens each, "
                          f"window {a.window}, stride {a.window}"}
    if a.reduced:
        meta["reduced"] = a.reduced
    todo = variants(calib, a.quick)
    if a.only:
        keep = set(a.only.split(","))
        todo = [t for t in todo if t[0] in keep]
    stem = f"quant_calib{suffix}"
    old: dict[str, dict] = {}
    if a.append and (RESULTS / f"{stem}.json").is_file():
        prev = json.loads((RESULTS / f"{stem}.json").read_text())
        old = {r["variant"]: r for r in prev["rows"] if "error" not in r}
        meta["appended_to"] = prev["meta"].get("date")
        pm, here = prev["meta"], f"{meta['date']}, {meta['machine']}"
        later = pm.get("machine_later", "")
        if pm.get("machine", meta["machine"]) != meta["machine"]:  # earlier rows keep their date and machine
            meta["date"], meta["machine"] = pm["date"], pm["machine"]
            if here not in later.split("; then "):
                later = f"{later}; then {here}" if later else here
        if later:
            meta["machine_later"] = later
    work = Path(tempfile.mkdtemp(prefix="slmc-bench-quant-calib-"))
    rows = [r for r in old.values() if r["variant"] not in {t[0] for t in todo}]
    model = ids = None
    if a.inproc and any(t[0] not in old for t in todo):
        from slmc import api

        model = api.load(a.model)
        ids = eval_ids(a, model)
    for i, (name, *_) in enumerate(todo):
        # as of the rows measured so far ("combined" follows the factors that won)
        _, kind, tests, passes = next(v for v in variants(calib, a.quick, rows) if v[0] == name)
        if name in old:
            rows.append(old[name])
        else:
            print(f"{name} ...", file=sys.stderr, flush=True)
            if model is not None:
                row = run_inproc(name, passes, a, model, ids)
            else:
                row = run_variant(name, passes, a, work)
            rows.append({**row, "kind": kind, "tests": tests})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        order = [v[0] for v in variants(calib, a.quick)]  # the table keeps the study's order
        rows.sort(key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
        meta["complete"] = i + 1 == len(todo)
        write_results(stem, {"meta": meta, "rows": rows}, echo=i + 1 == len(todo))


if __name__ == "__main__":
    main()
