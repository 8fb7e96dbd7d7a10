"""`slmc diff` on one model compiled by one recipe for ExecuTorch and LiteRT: the per-block table
of the .pte vs its reference IR, the .tflite vs its reference IR, and the .pte vs the .tflite
(issue 14's Done-when). Hidden states come from each target's debug variant in its own runtime
(README: "Layer-by-layer diff"); bounds are the fixed ones of runtime_tests/diff.py.

    flock /work/coord/heavy.lock python bench/diff.py [--pte DIR --tflite DIR] [--report FILE.html]
    python bench/diff.py --quick        # tiny random Llama (~3 min)

Artifacts given with --pte/--tflite are used as they are; otherwise both are compiled here.
Results: results/diff{,-quick}.{json,md}.
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
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--pte", type=Path, default=None, help="an existing .pte artifact folder")
    ap.add_argument("--tflite", type=Path, default=None, help="an existing .tflite artifact folder")
    ap.add_argument("--report", type=Path, default=None, help="also write the HTML report here")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, for a fast smoke test")
    a = ap.parse_args()
    from slmc import api

    work, model = bench_setup(a, "slmc-bench-diff-")
    folders, compile_s = {}, {}
    for target, given in (("executorch", a.pte), ("tflite", a.tflite)):
        if given is not None:
            folders[target] = given
            continue
        t0 = time.perf_counter()
        folders[target], _ = api.compile(api.CompileOptions(str(model), target=target, out=work / target,
                                                            recipe=a.recipe, max_seq_len=a.max_seq_len))
        compile_s[target] = round(time.perf_counter() - t0, 1)
    busy = set(busy_processes())
    pairs = []
    for x, y in ((folders["executorch"], None), (folders["tflite"], None), (folders["executorch"], folders["tflite"])):
        t0 = time.perf_counter()
        r = api.diff(x, y)
        busy |= set(busy_processes())
        pairs.append({**json.loads(r.to_json()), "wall_s": round(time.perf_counter() - t0, 1),
                      "a_name": api.read_manifest(x)["format"],
                      "b_name": "reference" if y is None else api.read_manifest(y)["format"]})
        if a.report:
            pairs[-1]["_report"] = r
    if a.report:
        reports = [p.pop("_report") for p in pairs]
        api.write_report(a.report, artifact=folders["executorch"], diffs=reports)
    manifest = api.read_manifest(folders["executorch"])
    data = {"machine": machine(), "model": "tiny random Llama (--quick)" if a.quick else str(a.model), "recipe": manifest.get("recipe") or a.recipe,
            "max_seq_len": manifest["kv_cache_spec"]["max_len"], "compile_s": compile_s, "pairs": pairs,
            "others_seen": sorted(busy)}
    write_results("diff-quick" if a.quick else "diff", data)


def _pair_table(p: dict) -> list[str]:
    lines = [f"### {p['a_name']} vs {p['b_name']} ({p['mode']}, {p['prompt_tokens']} prompt tokens)", "",
             f"Bound: relative RMS ≤ {p['bound']:.3g} ({p['bound_why']}). "
             + (f"First stage past the bound: **{p['first_past']}**." if p["first_past"]
                else "Every stage within the bound.")
             + f" Verdict: {p.get('verdict') or ('PASS' if p['passed'] else 'FAIL')} ({p['wall_s']} s).", ""]
    if p.get("noise_floor"):  # the reference's own rel RMS under a rounding-size nudge, per stage
        lines += ["Reference noise floor (1e-7 nudge), rel RMS per stage: "
                  + ", ".join(f"{s['stage']} {f:.3g}" for s, f in zip(p["stages"], p["noise_floor"])), ""]
    for s in p["sides"]:
        c = s.get("artifact_check")
        if c:
            lines.append(f"- {s['how']}; its last logits row vs the artifact's own: rel RMS {c['rel_rms']:.3g} "
                         f"({'matches' if c['matches'] else 'DIFFERS'})")
    lines += [""] + [f"- note: {n}" for n in p["notes"]] + ([""] if p["notes"] else [])
    lines += ["| stage | max abs Δ | rel RMS | cosine | within |", "|---|---:|---:|---:|---|"]
    lines += [f"| {s['stage']} | {s['max_abs']:.3g} | {s['rel_rms']:.3g} | {s['cosine']:.6f} | "
              f"{'yes' if s['within'] else '**no**'} |" for s in p["stages"]]
    return lines + [""]


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"# slmc diff: {data['model']}, recipe {data['recipe']}, max_seq_len {data['max_seq_len']}", "",
             f"{m['date']}, {m['cores']} cores, {m['cpu']}; torch {m['torch']}, executorch {m['executorch']}.", ""]
    if data["compile_s"]:
        lines += ["Compiled here: " + ", ".join(f"{k} {v} s" for k, v in data["compile_s"].items()) + ".", ""]
    for p in data["pairs"]:
        lines += _pair_table(p)
    lines += others_seen(data.get("others_seen", []))
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    main()
