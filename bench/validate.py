"""`slmc validate` on the host of one model compiled by one recipe: the verdict with its fixed
bounds, the measured statistics (mean KL, top-1, Δppl over teacher-forced windows), and the
reference's own noise floor that an INCONCLUSIVE verdict rests on (README: "Validation").

    flock /work/coord/heavy.lock python bench/validate.py [--artifact DIR] [--target executorch]
    python bench/validate.py --quick        # tiny random Llama (~1 min)

An artifact given with --artifact is validated as it is; otherwise one is compiled here.
Results: results/validate{,-quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import bench_setup, busy_processes, machine, others_seen, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="HF folder, or 'default' (SmolLM2-135M-Instruct)")
    ap.add_argument("--recipe", default="int8da-int4w-g32")
    ap.add_argument("--target", default="executorch")
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--artifact", type=Path, default=None, help="an existing artifact folder")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, for a fast smoke test")
    a = ap.parse_args()
    from slmc import api

    work, model = bench_setup(a, "slmc-bench-validate-")
    folder, compile_s = a.artifact, None
    if folder is None:
        t0 = time.perf_counter()
        folder, _ = api.compile(api.CompileOptions(str(model), target=a.target, out=work / a.target,
                                                   recipe=a.recipe, max_seq_len=a.max_seq_len))
        compile_s = round(time.perf_counter() - t0, 1)
    manifest = api.read_manifest(folder)
    report = api.validate_artifact(folder)
    data = {"machine": machine(), "model": "tiny random Llama (--quick)" if a.quick else
            "SmolLM2-135M-Instruct" if a.model == "default" else str(a.model),
            "recipe": manifest.get("recipe") or a.recipe, "format": manifest["format"],
            "max_seq_len": manifest["kv_cache_spec"]["max_len"], "compile_s": compile_s,
            "how": "compiled here" if compile_s is not None else f"given with --artifact ({folder})",
            "report": json.loads(report.to_json()), "others_seen": sorted(busy_processes())}
    write_results("validate-quick" if a.quick else "validate", data)


def _row(name: str, r: dict) -> str:
    return (f"| {name} | {r['positions']} | {r['mean_kl']:.3g} | {r['top1']:.1%} | "
            f"{r['delta_ppl']:+.2%} | {r['max_abs']:.3g} |")


def markdown(data: dict) -> str:
    m, r = data["machine"], data["report"]
    t = r["tolerance"]
    lines = [f"# `slmc validate`: {data['model']}, recipe {data['recipe']} ({data['format']}), "
             f"max_seq_len {data['max_seq_len']}", "",
             f"{m['date']}, {m['cores']} cores, {m['cpu']}; torch {m['torch']}, executorch {m['executorch']}. "
             f"Artifact {data['how']}" + (f" in {data['compile_s']} s" if data["compile_s"] is not None else "")
             + f"; validate took {r['seconds']:.0f} s.", "",
             f"Flow: {r['flow']} ({t['flow']}). Text: {r['text_source']}. Fixed bounds ({t['rule']}): "
             f"mean KL ≤ {t['max_kl']:g} nats, top-1 ≥ {t['min_top1']:.1%}, |Δppl| ≤ {t['max_dppl']:.2%}, "
             f"≥ {t['min_positions']} positions.", "",
             "| | positions | mean KL | top-1 | Δppl | max abs |", "|---|---:|---:|---:|---:|---:|"]
    lines.append(_row(f"artifact vs reference ({r['windows']} x {r['window_len']})",
                      {"positions": r["positions"], "mean_kl": r["mean_kl"], "top1": r["top1_agreement"],
                       "delta_ppl": r["delta_ppl"], "max_abs": r["prefill_max_abs"]}))
    if r.get("noise_floor"):
        f = r["noise_floor"]
        lines.append(_row(f"reference nudged {f['nudge']:g} vs reference", f))
    lines += ["", f"Verdict: **{r['verdict']}**. " + "; ".join(r["reasons"]), ""]
    lines += [f"- {n}" for n in r["notes"]]
    if r.get("first_divergence") is not None:
        lines.append(f"- greedy tokens first differ at step {r['first_divergence']} of {r['decode_steps']}")
    lines += [""] + others_seen(data.get("others_seen", []))
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    main()
