"""Artifacts checked on the arm64 emulator: `slmc validate --on qemu-arm64` per flow.

    python bench/device.py                # tiny random Llama: ExecuTorch and LiteRT, float and 8da4w
                                          #   (the int8da-int4w-g32 recipe: AWQ, and its -rtn twin)
    python bench/device.py --smollm2      # only SmolLM2-135M int8da-int4w-g32 on ExecuTorch/XNNPACK, its
                                          #   row merged into results/device.json (the tiny rows kept);
                                          #   hold /work/coord/heavy.lock or its equivalent
    python bench/device.py --by-block     # the block-isolated check (`validate --by-block`) of the tiny
                                          #   ExecuTorch and LiteRT flows, host and emulator; with
                                          #   --smollm2 SmolLM2's instead (--artifact OUT: an existing
                                          #   compile of it); rows merged into results/device.json
    python bench/device.py --render       # results/device.md again from results/device.json

Records the emulator's setup (seconds per stage, from its device.json; `cached` when it
already existed), then per flow what `validate --on` measured inside the emulator over the
host's teacher-forced windows: positions, mean KL(reference ‖ artifact), Δppl, top-1, the
logits' max |Δ| (teacher-forced rows and the greedy prompt; free-running decode), greedy
equality, the verdict and the bound it applied (the flow's fixed bound, targets/bounds.py),
the host-vs-emulator difference of the same windows' logits, compile and emulator seconds.
Writes bench/results/device.json and device.md.

`--by-block` rows: per flow and place (this host, the emulator) the block-isolated verdict
(runtime_tests/isolated.py: every block fed the artifact's own input, its update's relative error
under the flow's fixed bound, with the reference's noise floor per stage), the first stage past
the bound, the worst stage, the host-vs-emulator difference of the debug program's states, the
end-to-end verdict recorded in the artifact's manifest (INCONCLUSIVE stays visible) and every
stage's numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine, tiny_model, write_results

TINY = [("executorch", "xnnpack", None), ("executorch", "xnnpack", "int8da-int4w-g32-rtn"),
        ("executorch", "xnnpack", "int8da-int4w-g32"), ("tflite", "cpu", None),
        ("tflite", "cpu", "int8da-int4w-g32-rtn"), ("tflite", "cpu", "int8da-int4w-g32")]
SMOLLM2 = ("executorch", "xnnpack", "int8da-int4w-g32")
TINY_BY_BLOCK = [("executorch", "xnnpack", None), ("executorch", "xnnpack", "int8da-int4w-g32"),
                 ("tflite", "cpu", None), ("tflite", "cpu", "int8da-int4w-g32")]


def bound_text(tol: dict) -> str:
    """The bound the verdict applied, as the README's table states it."""
    if tol.get("rule") == "exact":
        return (f"max abs <= {tol['max_abs']:g}, top-1 >= {tol['min_top1']:.0%}"
                + (", greedy equal" if tol.get("greedy_equal") else ""))
    if tol.get("rule") == "statistical":
        return (f">= {tol['min_positions']} positions, KL <= {tol['max_kl']:g}, top-1 >= {tol['min_top1']:.0%}, "
                f"abs dppl <= {tol['max_dppl']:.2%}")
    return "none published"


def run_flow(api, model: str, name: str, target: str, backend: str, recipe: str | None, work: Path,
             max_len: int) -> dict:
    out = work / f"{name}-{target}-{recipe or 'float'}"
    t = time.time()
    api.compile_model(model, target, backend, out, max_seq_len=max_len, recipe=recipe)
    compile_s = round(time.time() - t, 1)
    r = api.validate(out, api.ValidateOptions(on="qemu-arm64", record=False))
    host = next((n for n in r.notes if n.startswith("host vs qemu-arm64")), "")
    m = re.search(r"max \|Δ\| logits (\S+) over \d+ teacher-forced positions, greedy tokens (\w+)", host)
    dev = next((n for n in r.notes if n.startswith("on qemu-arm64")), "")
    s = re.search(r"checker ran in (\S+) s", dev)
    return {"model": name, "flow": f"{target}/{backend} {recipe or 'float'}", "verdict": r.verdict,
            "passed": r.passed, "reasons": r.reasons, "compile_s": compile_s,
            "emulator_s": float(s.group(1)) if s else None, "positions": r.positions, "windows": r.windows,
            "window_len": r.window_len, "mean_kl": r.mean_kl, "delta_ppl": r.delta_ppl,
            "prefill_max_abs": r.prefill_max_abs, "decode_max_abs": r.decode_max_abs,
            "top1": r.top1_agreement, "greedy_equal": r.greedy_equal, "steps": r.decode_steps,
            "prompt_tokens": r.prompt_tokens, "tolerance": r.tolerance, "bound": bound_text(r.tolerance),
            "noise_floor": r.noise_floor, "host_vs_emulator_max_abs": float(m.group(1)) if m else None,
            "host_vs_emulator_greedy": m.group(2) if m else None, "notes": r.notes}


def by_block_row(api, folder: Path, name: str, flow: str, on: str | None) -> dict:
    t = time.time()
    r = api.validate_by_block(folder, api.ValidateOptions(on=on))
    worst = max(r.stages, key=lambda s: s["rel"] / r.bound)
    return {"model": name, "flow": flow, "where": on or "host", "verdict": r.verdict, "bound": r.bound,
            "bound_why": r.bound_why, "first_past": r.first_past, "worst_stage": worst["stage"],
            "worst_rel": worst["rel"], "worst_floor": worst["floor"], "prompt_tokens": r.prompt_tokens,
            "past": [s["stage"] for s in r.stages if not s["within"]], "artifact_check": r.artifact_check,
            "host_vs_device": r.host_vs_device, "end_to_end": r.end_to_end, "seconds": round(time.time() - t, 1),
            "stages": [{k: s[k] for k in ("stage", "rel", "max_abs", "cosine", "floor", "within")} for s in r.stages],
            "notes": r.notes, "what": r.what}


def run_by_block(api, model: str, name: str, target: str, backend: str, recipe: str | None, work: Path,
                 max_len: int, artifact: Path | None = None) -> list[dict]:
    out = artifact or work / f"{name}-{target}-{recipe or 'float'}"
    if artifact is None:  # a fresh compile: its end-to-end verdict on the emulator recorded first
        api.compile_model(model, target, backend, out, max_seq_len=max_len, recipe=recipe)
        api.validate(out, api.ValidateOptions(on="qemu-arm64"))
    flow = f"{target}/{backend} {recipe or 'float'}"
    return [by_block_row(api, out, name, flow, on) for on in (None, "qemu-arm64")]


def _by_block_lines(rows: list[dict]) -> list[str]:
    lines = ["## Block-isolated check (`slmc validate --by-block [--on qemu-arm64]`)", "",
             rows[0]["what"][0].upper() + rows[0]["what"][1:] + ". Per stage: a block's ‖art_out − ref_out‖ / "
             "‖ref_out − art_in‖ (the update), the embedding, final norm and logits ‖Δ‖ / ‖ref‖; the noise floor "
             "is the reference's own stage on its input nudged by 1e-7. Bounds fixed in advance "
             "(slmc/runtime_tests/isolated.py).", "",
             "| model | flow | where | verdict | bound | first past | worst stage (rel / floor) | host vs emulator "
             "states (max abs / max rel) | end-to-end verdict (recorded) | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hv = r["host_vs_device"]
        hv = "-" if not hv else f"{hv['max_abs']:.3g} / {hv['max_rel_rms']:.3g}"
        e = r["end_to_end"]
        e = "none recorded" if not e else f"{e.get('verdict')} ({e.get('runtime')})"
        lines.append(f"| {r['model']} | {r['flow']} | {r['where']} | {r['verdict']} | {r['bound']:g} | "
                     f"{r['first_past'] or '-'} | {r['worst_stage']} ({r['worst_rel']:.3g} / {r['worst_floor']:.3g}) | "
                     f"{hv} | {e} | {r['seconds']} |")
    lines.append("")
    for r in rows:
        if r["verdict"] != "PASS" or len(r["stages"]) > 5:
            lines += [f"{r['model']} {r['flow']} on {r['where']}, every stage (rel / floor): " + ", ".join(
                f"{s['stage']} {s['rel']:.3g} / {s['floor']:.3g}{'' if s['within'] else ' **past**'}"
                for s in r["stages"]), ""]
            lines += [f"- note: {n}" for n in r["notes"]] + [""]
    return lines


def markdown(data: dict) -> str:
    s = data["setup"]
    lines = ["# Artifacts on the arm64 emulator (`slmc validate --on qemu-arm64`)", "",
             f"Emulator: {s.get('cpu')} under qemu-user ({s.get('mode')}), Debian {s.get('debian')}; setup "
             f"{'cached' if s.get('cached') else 'built'}: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items())
             + f" (total {sum(s['seconds'].values()):.0f} s). Runtimes: "
             + ", ".join(f"{k} {'ok' if v is None else 'NO: ' + v}" for k, v in s["runtimes"].items()) + ".", "",
             "Each flow: the host's teacher-forced windows (sampled by the reference, seed 0, as host "
             "`slmc validate` samples them) and its greedy prompt run inside the emulator; every row's logits "
             "judged on the host by host validation's verdict under the flow's fixed bound.", "",
             "| model | flow | verdict | positions (windows x len) | mean KL | dppl | top-1 | max abs (rows / decode) "
             "| greedy equal | bound applied | host vs emulator max abs | compile s | emulator s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["flows"]:
        hv = "-" if r["host_vs_emulator_max_abs"] is None else \
            f"{r['host_vs_emulator_max_abs']:.3g} (greedy {r['host_vs_emulator_greedy']})"
        lines.append(f"| {r['model']} | {r['flow']} | {r['verdict']} | {r['positions']} ({r['windows']} x "
                     f"{r['window_len']}) | {r['mean_kl']:.3g} | {r['delta_ppl']:+.3%} | {r['top1']:.2%} | "
                     f"{r['prefill_max_abs']:.3g} / {r['decode_max_abs']:.3g} | {'yes' if r['greedy_equal'] else 'no'} "
                     f"| {r['bound']} | {hv} | {r['compile_s']} | {r['emulator_s']} |")
    reasons = [f"- {r['model']} {r['flow']}: {r['verdict']}: {'; '.join(r['reasons'])}" for r in data["flows"]
               if r["verdict"] != "PASS"]
    lines += [""] + (["Not passing:", *reasons, ""] if reasons else [])
    if data.get("by_block"):
        lines += _by_block_lines(data["by_block"])
    lines += [f"Machine: {data['machine'].get('cpu', '?')}; {data['date']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--by-block", action="store_true")
    ap.add_argument("--artifact", type=Path, default=None, help="--by-block --smollm2: an existing compile")
    a = ap.parse_args()
    if a.render:
        from _common import render

        render("device")
        return
    from slmc import api

    setup = api.device_setup("qemu-arm64")
    if a.by_block:  # its rows merged into the last results (the validate rows kept)
        old = json.loads((RESULTS / "device.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            if a.smollm2:
                rows = run_by_block(api, api.DEFAULT_MODEL, "SmolLM2-135M", *SMOLLM2, Path(tmp), 128, a.artifact)
            else:
                tiny = tiny_model(Path(tmp))
                rows = [r for flow in TINY_BY_BLOCK for r in run_by_block(api, tiny, "tiny-llama", *flow, Path(tmp), 48)]
        keep = [r for r in old.get("by_block", []) if (r["model"], r["flow"]) not in {(x["model"], x["flow"]) for x in rows}]
        write_results("device", {**old, "by_block": keep + rows})
        return
    flows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if a.smollm2:  # the tiny rows of the last run (read when this one ends) stay; SmolLM2's replaces its own
            row = run_flow(api, api.DEFAULT_MODEL, "SmolLM2-135M", *SMOLLM2, work, 128)
            old = RESULTS / "device.json"
            flows = [f for f in json.loads(old.read_text())["flows"] if f["model"] != "SmolLM2-135M"] \
                if old.is_file() else []
            flows.append(row)
        else:
            tiny = tiny_model(work)
            for target, backend, recipe in TINY:
                flows.append(run_flow(api, tiny, "tiny-llama", target, backend, recipe, work, 48))
                print(json.dumps(flows[-1]), file=sys.stderr)
    old = RESULTS / "device.json"
    by_block = json.loads(old.read_text()).get("by_block", []) if old.is_file() else []
    write_results("device", {"setup": setup, "flows": flows, "machine": machine(),
                             "date": time.strftime("%Y-%m-%d"), **({"by_block": by_block} if by_block else {})})


if __name__ == "__main__":
    main()
