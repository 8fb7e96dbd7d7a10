"""Where the 8da4w recipes lose their quality (issue 18): the recipes' method on the block
linears alone, then one step at a time toward what the artifact runs.

    flock /work/coord/heavy.lock python bench/quant_split.py     # SmolLM2-135M-Instruct, ../shared/corpus
    python bench/quant_split.py --quick                          # tiny random Llama, smoke test

quant_calib.md measures the block linears' method with the embedding, the head and the
activations in float; quant_e2e.md measures whole artifacts (int8 activations, quantized
embedding and head) in their runtimes, which lose three times as much. This script fills
the gap in slmc's reference executor, which runs the IR as the artifact must (XNNPACK's
per-token int8 activations included; `slmc validate` holds each artifact to it). Each row
takes the recipe's own passes (`api.recipe_passes`) and removes or adds one option of its
quantizer: bf16 scales, int8 activations, int8 or int4 embedding and head. Calibration:
data-free, as a recipe without --calib, and with --calib (Emma) for the two recipes.
Evaluation: the first 4096 tokens of Northanger Abbey (no calibration saw it), windows of
512, stride 512, as quant_calib.md; KL and top-1 against fp32 on the same windows.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time
from pathlib import Path

from _common import CORPUS, RESULTS, head_commit, render, tiny_model, write_results

EVAL_TEXT = "austen_northangerabbey.txt"
CALIB_TEXT = "austen_emma.txt"
GOAL = 8.0  # issue 18: int4 g32 + int8 activations end to end, % perplexity over fp32
RECIPES = ("int4-g32-xnnpack", "int8da-int4w-g32")
XNN = {"scale_dtype", "act_bits"}  # what XNNPACK's scheme adds to a float-activation quantizer
ENDS = {"embed_bits", "head_bits", "ends_group_size"}


def _opts(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def _spec(name: str, d: dict[str, str]) -> str:
    return f"{name}:" + ",".join(f"{k}={v}" for k, v in d.items())


def variants(calib: str) -> list[tuple[str, str, list[str]]]:
    """(row, what it changes, passes). The recipes' passes as `slmc compile --recipe` runs them;
    the steps between them edit only the last pass's (the quantizer's) options."""
    from slmc import api

    ends8, ends4 = (api.recipe_passes(r, "executorch", "xnnpack") for r in RECIPES)
    awq, q8 = ends8[:-1], _opts(ends8[-1])
    q4 = _opts(ends4[-1])

    def edit(q, drop=(), **add) -> list[str]:
        return awq + [_spec(q[0], {**{k: v for k, v in q[1].items() if k not in drop}, **add})]

    def calibrated(passes: list[str]) -> list[str]:
        return [f"{p},calib={calib}" if p.startswith(("quant.awq", "quant.gptq", "quant.mixed")) else p for p in passes]

    return [
        ("fp32", "reference", []),
        ("linears", "the method alone: int4 g32 block linears, fp32 scales; embedding, head, activations float",
         edit(q8, drop=XNN | ENDS)),
        ("+ bf16 scales", "scales stored as XNNPACK stores them", edit(q8, drop=ENDS | {"act_bits"})),
        ("+ int8 activations", "XNNPACK's per-token int8 activations (embedding and head float)", edit(q8, drop=ENDS)),
        ("linears + int8 ends", "embedding and head int8 per row, activations float", edit(q8, drop=XNN)),
        ("linears + int4 ends", "embedding and head int4 g32, activations float", edit(q4, drop=XNN)),
        (RECIPES[0], "recipe: int8 activations + int8 ends", ends8),
        (RECIPES[1], "recipe: int8 activations + int4 ends (one table: the embedding takes the head's codes, "
         "as LiteRT and ExecuTorch store it)", ends4),
        (f"{RECIPES[0]} own embedding codes", "the embedding keeps its own RTN codes (share_tied=false: what "
         "ExecuTorch compiled until it stored a shared quantized table once)", [*ends8[:-1], f"{ends8[-1]},share_tied=false"]),
        (f"{RECIPES[1]} own embedding codes", "the embedding keeps its own RTN codes (share_tied=false: what "
         "ExecuTorch compiled until it stored a shared quantized table once)", [*ends4[:-1], f"{ends4[-1]},share_tied=false"]),
        (f"{RECIPES[0]} --calib", f"recipe, calibrated on {Path(calib).name}", calibrated(ends8)),
        (f"{RECIPES[1]} --calib", f"recipe, calibrated on {Path(calib).name}", calibrated(ends4)),
        ("linears + quant.mixed 10 %", "the 10 % of extra bytes to the most sensitive linears at int8 per channel "
         "(quant.mixed, never measured before), float ends and activations",
         awq + ["quant.mixed:budget=0.1,bits=4,group_size=32", edit(q8, drop=XNN | ENDS)[-1]]),
        (f"{RECIPES[0]} + quant.mixed 10 %", "the recipe with quant.mixed's 10 % before its quantizer "
         "(the int8 linears run as 8da8w)", awq + ["quant.mixed:budget=0.1,bits=4,group_size=32"] + ends8[-1:]),
        (f"{RECIPES[0]} + quant.mixed 10 % --calib", f"the same, calibrated on {Path(calib).name}",
         calibrated(awq + ["quant.mixed:budget=0.1,bits=4,group_size=32"] + ends8[-1:])),
        ("int8da-int4w-g32-rtn", "round to nearest, same layout (the fast-compile recipe)",
         api.recipe_passes("int8da-int4w-g32-rtn", "executorch", "xnnpack")),
    ]


def shrink(passes: list[str]) -> list[str]:
    """--quick: tiny calibration so the smoke test takes seconds."""
    return [f"{p},n_seqs=2,seq_len=16" if p.startswith(("quant.awq", "quant.gptq", "quant.mixed")) else p for p in passes]


def prefix(folded: dict, head: tuple, fp32):
    """The model after the passes `head` (all but the quantizer) and their seconds, from the
    longest prefix already run: the AWQ fold is searched once for every row that shares it."""
    from slmc import api

    k = next((k for k in range(len(head), 0, -1) if head[:k] in folded), 0)
    base, s = folded[head[:k]] if k else (fp32, 0.0)
    if k < len(head):
        t0 = time.time()
        folded[head] = (api.run_passes(copy.deepcopy(base), list(head[k:]))[0], s + time.time() - t0)
    return folded[head] if head else (fp32, 0.0)


def measure(rows: list, a) -> list[dict]:
    import torch

    from slmc import api

    torch.set_num_threads(a.threads)
    fp32 = api.load(a.model)
    tok = api.tokenizer_dir(fp32.source.get("path")) / "tokenizer.json"
    ids = api.token_ids([a.eval_text], tok, min_tokens=a.window)[:a.eval_tokens]
    folded: dict[tuple, tuple] = {}  # the AWQ fold (no quantizer) is shared by rows with equal passes
    commit = head_commit()
    out = []
    for name, what, passes in rows:
        head, last = tuple(passes[:-1]), passes[-1:]
        start, fold_s = prefix(folded, head, fp32)
        t1 = time.time()
        model = api.run_passes(copy.deepcopy(start), last)[0] if passes else fp32
        pass_s = fold_s + time.time() - t1
        rep = api.evaluate_tokens(ids, model, name, fp32 if passes else None, window=a.window, stride=a.window)
        out.append({"row": name, "changes": what, "passes": passes, "perplexity": rep.perplexity,
                    "kl": rep.kl_divergence if passes else 0.0, "top1": rep.top1_agreement if passes else 1.0,
                    "weight_bytes": api.weight_bytes(model), "pass_s": round(pass_s, 1),
                    "eval_s": round(time.time() - t1 - (pass_s - fold_s), 1),
                    # data-free samples depend on the thread count (float sums pick other tokens)
                    "commit": commit, "threads": a.threads})
        print(json.dumps(out[-1]), flush=True)
    return out


def markdown(data: dict) -> str:
    m, rows = data["meta"], data["rows"]
    base = next(r["perplexity"] for r in rows if r["row"] == "fp32")
    lines = [f"# Where the 8da4w recipes lose quality ({m['model']})", "",
             f"{m['date']}, {m['machine']}. slmc's reference executor (the IR as the artifact must run it). "
             f"Evaluation: {m['evaluation']}; calibration data-free unless the row says --calib ({m['calibration']}).",
             "", "| row | changes | ppl | Δppl | KL (nats) | top-1 vs fp32 | weights MiB | pass s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['changes']} | {r['perplexity']:.2f} | {100 * (r['perplexity'] / base - 1):+.1f} % "
                     f"| {r['kl']:.4f} | {100 * r['top1']:.1f}% | {r['weight_bytes'] / 2**20:.1f} | {r['pass_s']} |")
    d = {r["row"]: 100 * (r["perplexity"] / base - 1) for r in rows}
    lines += ["", f"Goal (issue 18): int4 g32 + int8 activations ≤ +{GOAL:.0f} % perplexity over fp32 "
              "(here in the IR; the artifacts' own figures are quant_e2e.md's).", "",
              "| recipe | calibration | Δppl | result |", "|---|---|---:|---|"]
    goal_rows = [(r, name, kind) for r in RECIPES for name, kind in ((r, "data-free"), (f"{r} --calib", "calibrated"))]
    goal_rows += [("int4-g32-xnnpack-mixed", f"{RECIPES[0]} + quant.mixed 10 %", "data-free"),
                  ("int4-g32-xnnpack-mixed", f"{RECIPES[0]} + quant.mixed 10 % --calib", "calibrated")]
    for r, name, kind in goal_rows:
        if name in d:
            lines.append(f"| {r} | {kind} | {d[name]:+.2f} % | {'met' if d[name] <= GOAL else 'not met'} |")
    steps = [("bf16 scales", "+ bf16 scales", "linears"), ("int8 activations", "+ int8 activations", "+ bf16 scales"),
             ("int8 ends (float activations)", "linears + int8 ends", "linears"),
             ("int4 ends (float activations)", "linears + int4 ends", "linears"),
             ("int8 ends (int8 activations)", RECIPES[0], "+ int8 activations"),
             ("int4 ends (int8 activations)", RECIPES[1], "+ int8 activations")]
    lines += ["", "Each step's cost, in points of Δppl against the row it extends:", "",
              "| step | row | against | points |", "|---|---|---|---:|"]
    run = {r["row"]: (r.get("commit"), r.get("threads")) for r in rows}
    lines += [f"| {s} | {r} | {b} | {d[r] - d[b]:+.1f}{' (rows of two runs)' if run[r] != run[b] else ''} |"
              for s, r, b in steps if r in d and b in d]
    runs: dict[tuple, list[str]] = {}
    for r in rows:
        runs.setdefault((r.get("commit", "?"), r.get("threads", "?")), []).append(r["row"])
    if len(runs) > 1:  # appended rows: say which run measured which
        lines += ["", "Runs in this table (data-free samples, and so the rows, differ with the torch thread count):", ""]
        lines += [f"- commit {c}, {t} torch thread{'s' if t != 1 else ''}: {', '.join(names)}"
                  for (c, t), names in runs.items()]
    lines += ["", "Passes of each row:", ""] + [f"- {r['row']}: `{' '.join(r['passes']) or '(none)'}`" for r in rows]
    for prev in data.get("previous", []):  # an earlier run of this script, kept to show what a change did
        pb = next(r["perplexity"] for r in prev["rows"] if r["row"] == "fp32")
        lines += ["", f"Earlier run ({prev['label']}):", "", "| row | Δppl | KL (nats) | top-1 vs fp32 | now Δppl |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['row']} | {100 * (r['perplexity'] / pb - 1):+.1f} % | {r['kl']:.4f} | {100 * r['top1']:.1f}% | "
                  + (f"{d[r['row']]:+.1f} % |" if r["row"] in d else "- |") for r in prev["rows"] if r["row"] != "fp32"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated rows (fp32 always runs)")
    ap.add_argument("--append", action="store_true", help="keep the rows of the last results not run now")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render", action="store_true", help="only re-render results/quant_split*.md")
    a = ap.parse_args()
    if a.render:
        return render("quant_split")
    corpus = Path(a.corpus)
    a.eval_text, calib = str(corpus / EVAL_TEXT), str(corpus / CALIB_TEXT)
    if a.quick:
        a.model = tiny_model(Path("/tmp"), "slmc-bench-quant-split-tiny")
        a.eval_tokens, a.window = 600, 128
    rows = variants(calib)
    if a.only:
        keep = set(a.only.split(",")) | {"fp32"}
        rows = [r for r in rows if r[0] in keep]
    if a.quick:
        rows = [(n, w, shrink(p)) for n, w, p in rows]
    meta = {"model": "tiny random Llama" if a.quick else a.model, "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "evaluation": f"{EVAL_TEXT}, first {a.eval_tokens} tokens, window {a.window}, stride {a.window}",
            "calibration": CALIB_TEXT}
    stem = "quant_split-quick" if a.quick else "quant_split"
    new = measure(rows, a)
    if a.append and (RESULTS / f"{stem}.json").is_file():  # the rows not run now stay, in the table's order
        prev = json.loads((RESULTS / f"{stem}.json").read_text())
        done = {r["row"] for r in new}
        order = [v[0] for v in variants(calib)]
        new = sorted(new + [r for r in prev["rows"] if r["row"] not in done],
                     key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
        meta["appended_to"] = prev["meta"]["date"]
    data = {"meta": meta, "rows": new}
    if (RESULTS / f"{stem}.json").is_file():  # earlier runs kept for comparison stay (labelled, dated)
        data["previous"] = json.loads((RESULTS / f"{stem}.json").read_text()).get("previous", [])
    write_results(stem, data)


if __name__ == "__main__":
    main()
