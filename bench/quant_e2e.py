"""Quantized quality end to end (issue 18, goal "with int8 activations end to end in the .pte and
.tflite: <= +8 %"): one recipe compiled for ExecuTorch and LiteRT, each artifact evaluated in its
own runtime with `slmc eval ARTIFACT` on a novel no calibration saw, beside the reference
executor running the artifact's own pass pipeline (what the artifact should compute).

    flock /work/coord/heavy.lock nice -n 5 python bench/quant_e2e.py [--recipe R] [--targets executorch tflite]
    python bench/quant_e2e.py --quick        # tiny random Llama, short texts (~2 min)

Evaluation: the first --eval-tokens tokens of --eval-text (Northanger Abbey, as
bench/quant_calib.py), windows of --window tokens with stride = window (every token scored once;
the same protocol as quant_calib.md, so its weight-only rows compare with these). The artifact
runs one decode step per token; its KV cache is --max-seq-len (> window).
Results: results/quant_e2e{,-quick}.{json,md}; --append keeps the rows of targets not run now.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import CORPUS, RESULTS, bench_setup, busy_processes, dir_bytes, machine, others_seen, write_results

GOAL = 8.0  # issue 18: % perplexity over fp32, int4 g32 + int8 activations, end to end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="HF folder, or 'default' (SmolLM2-135M-Instruct)")
    ap.add_argument("--recipe", default="int8da-int4w-g32")
    ap.add_argument("--targets", nargs="+", default=["executorch", "tflite"])
    ap.add_argument("--eval-text", default=str(CORPUS / "austen_northangerabbey.txt"))
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-seq-len", type=int, default=640)
    ap.add_argument("--calib", default=None, help="calibration text for the recipe (default: data-free)")
    ap.add_argument("--artifact", action="append", default=[], metavar="TARGET=DIR",
                    help="evaluate this already compiled artifact folder for TARGET instead of compiling one")
    ap.add_argument("--no-ir", action="store_true",
                    help="skip the reference executor's row (it reruns the passes: calibration again)")
    ap.add_argument("--note", default="", help="say in the results what is unusual about this run's rows")
    ap.add_argument("--label", default=None, help="the rows' name in the table (default: the recipe); --append "
                    "replaces only rows of the same label and target")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, short texts")
    a = ap.parse_args()
    if a.quick:
        a.eval_tokens, a.window, a.max_seq_len = 300, 64, 128
    from slmc import api

    work, model = bench_setup(a, "slmc-bench-quant-e2e-")
    stem = "quant_e2e-quick" if a.quick else "quant_e2e"
    rows = []
    if a.append and (RESULTS / f"{stem}.json").is_file():
        rows = [r for r in json.loads((RESULTS / f"{stem}.json").read_text())["rows"]
                if not (r["target"] in a.targets and r["label"] == (a.label or a.recipe))]
    evals = dict(texts=(a.eval_text,), window=a.window, stride=a.window, max_tokens=a.eval_tokens)
    busy = set(busy_processes())
    given = dict(x.split("=", 1) for x in a.artifact)
    for target in a.targets:
        t0 = time.perf_counter()
        if target in given:
            folder, compile_s = Path(given[target]), None
        else:
            folder, _ = api.compile(api.CompileOptions(str(model), target=target, out=work / target, recipe=a.recipe,
                                                       max_seq_len=a.max_seq_len,
                                                       calib=(a.calib,) if a.calib else ()))
            compile_s = round(time.perf_counter() - t0, 1)
        manifest = api.read_manifest(folder)
        if manifest.get("recipe") != a.recipe:
            raise SystemExit(f"{folder} was compiled with recipe {manifest.get('recipe')!r}, not {a.recipe!r}")
        passes = tuple(f"{p['name']}:" + ",".join(f"{k}={v}" for k, v in p["options"].items() if v != "")
                       for p in manifest["pipeline"])
        t0 = time.perf_counter()
        art = api.evaluate(str(folder), api.EvalOptions(**evals))
        art_s = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        ir = None if a.no_ir else api.evaluate(str(model), api.EvalOptions(**evals, passes=passes,
                                                                           calib=(a.calib,) if a.calib else ()))
        ir_s = round(time.perf_counter() - t0, 1)
        busy |= set(busy_processes())
        rows.append({"label": a.label or a.recipe, "target": target, "format": manifest["format"], "recipe": a.recipe,
                     "passes": list(passes), "window": a.window, "max_seq_len": manifest["kv_cache_spec"]["max_len"],
                     "note": a.note, "date": machine()["date"], "calib": Path(a.calib).name if a.calib else "data-free",
                     "artifact_mib": round(dir_bytes(folder) / 2**20, 1), "compile_s": compile_s,
                     "artifact": {**art.to_dict(), "seconds": art_s}, "ir": None if ir is None else {**ir.to_dict(), "seconds": ir_s}})
        data = {"machine": machine(), "model": "tiny random Llama (--quick)" if a.quick else
                "SmolLM2-135M-Instruct" if a.model == "default" else str(a.model),
                "eval_text": Path(a.eval_text).name, "eval_tokens": a.eval_tokens,
                "calib": Path(a.calib).name if a.calib else "data-free", "rows": rows, "others_seen": sorted(busy)}
        write_results(stem, data, echo=target == a.targets[-1])  # after every target: a stopped run keeps its rows


def _d(r: dict) -> float:
    return 100 * (r["perplexity"] / r["reference_perplexity"] - 1)


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"# Quantized quality end to end: {data['model']}", "",
             f"{m['date']}, {m['cores']} cores, {m['cpu']}; torch {m['torch']}, executorch {m['executorch']}. "
             f"Evaluation: {data['eval_text']} (text no calibration saw), first {data['eval_tokens']} tokens, "
             f"windows of the row's length, stride = window (every token scored once). "
             "Calibration: each row's (column).", "",
             "| rows | target | calibration | computed by | window / KV | ppl | fp32 ppl | Δppl | KL (nats) | top-1 vs fp32 "
             "| folder MiB (check/ included) | compile s | eval s |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        for who, e in ((f"the .{r['format']} in its runtime", r["artifact"]), ("reference executor, same passes", r["ir"])):
            if e is None:  # --no-ir
                continue
            lines.append(f"| {r['label']} | {r['target']} | {r.get('calib', data['calib'])} | {who} | {r['window']} / {r['max_seq_len']} | {e['perplexity']:.2f} | "
                         f"{e['reference_perplexity']:.2f} | {_d(e):+.1f} % | {e['kl_divergence']:.4f} | "
                         f"{e['top1_agreement']:.1%} | {r['artifact_mib'] if 'runtime' in who else '-'} | "
                         f"{(r['compile_s'] if r['compile_s'] is not None else 'given') if 'runtime' in who else '-'} | {e['seconds']} |")
    lines += ["", f"Goal (issue 18): int4 g32 + int8 activations end to end ≤ +{GOAL:g} % perplexity over fp32.", "",
              "| rows | target | measured end to end | result |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['target']} | {_d(r['artifact']):+.1f} % | "
              f"{'met' if _d(r['artifact']) <= GOAL else 'not met'} |" for r in data["rows"]]
    lines += ["", "Each row (measured when; passes from the artifact's manifest):", ""]
    lines += [f"- {r['label']}, {r['target']} ({r['date']}): `{' '.join(r['passes'])}`"
              + (f". Note: {r['note']}" if r.get("note") else "") for r in data["rows"]]
    lines += [""] + others_seen(data.get("others_seen", []))
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    main()
