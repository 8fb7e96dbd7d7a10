"""Artifacts checked on the arm64 emulator: `slmc validate --on qemu-arm64` per flow.

    python bench/device.py                # tiny random Llama: ExecuTorch and LiteRT, float and 8da4w
    python bench/device.py --smollm2      # + SmolLM2-135M int8da-int4w-g32 on ExecuTorch/XNNPACK
                                          #   (hold /work/coord/heavy.lock or its equivalent)
    python bench/device.py --render       # results/device.md again from results/device.json

Records the emulator's setup (seconds per stage, from its device.json; `cached` when it
already existed), then per flow: compile seconds, the emulator's run seconds, the logits'
max |Δ| against the host's reference (prefill, decode), top-1, greedy equality, the bound,
and the host-vs-emulator difference of the same bundle's logits.
Writes bench/results/device.json and device.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, tiny_model, write_results

TINY = [("executorch", "xnnpack", None), ("executorch", "xnnpack", "int8da-int4w-g32"),
        ("tflite", "cpu", None), ("tflite", "cpu", "int8da-int4w-g32")]


def run_flow(api, model: str, name: str, target: str, backend: str, recipe: str | None, work: Path,
             max_len: int) -> dict:
    out = work / f"{name}-{target}-{recipe or 'float'}"
    t = time.time()
    api.compile_model(model, target, backend, out, max_seq_len=max_len, recipe=recipe)
    compile_s = round(time.time() - t, 1)
    r = api.validate(out, api.ValidateOptions(on="qemu-arm64", record=False))
    host = next((n for n in r.notes if n.startswith("host vs qemu-arm64")), "")
    m = re.search(r"max \|Δ\| logits (\S+), greedy tokens (\w+)", host)
    dev = next((n for n in r.notes if n.startswith("on qemu-arm64")), "")
    s = re.search(r"checker ran in (\S+) s", dev)
    return {"model": name, "flow": f"{target}/{backend} {recipe or 'float'}", "passed": r.passed,
            "compile_s": compile_s, "emulator_s": float(s.group(1)) if s else None,
            "prefill_max_abs": r.prefill_max_abs, "decode_max_abs": r.decode_max_abs,
            "top1": r.top1_agreement, "greedy_equal": r.greedy_equal, "steps": r.decode_steps,
            "prompt_tokens": r.prompt_tokens, "bound_max_abs": r.tolerance["max_abs"],
            "host_vs_emulator_max_abs": float(m.group(1)) if m else None,
            "host_vs_emulator_greedy": m.group(2) if m else None, "notes": r.notes}


def markdown(data: dict) -> str:
    s = data["setup"]
    lines = ["# Artifacts on the arm64 emulator (`slmc validate --on qemu-arm64`)", "",
             f"Emulator: {s.get('cpu')} under qemu-user ({s.get('mode')}), Debian {s.get('debian')}; setup "
             f"{'cached' if s.get('cached') else 'built'}: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items())
             + f" (total {sum(s['seconds'].values()):.0f} s). Runtimes: "
             + ", ".join(f"{k} {'ok' if v is None else 'NO: ' + v}" for k, v in s["runtimes"].items()) + ".", "",
             "| model | flow | pass | prompt + steps | prefill max abs | decode max abs | bound | top-1 | greedy equal "
             "| host vs emulator max abs | compile s | emulator s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["flows"]:
        lines.append(f"| {r['model']} | {r['flow']} | {'PASS' if r['passed'] else 'FAIL'} | {r['prompt_tokens']} + "
                     f"{r['steps']} | {r['prefill_max_abs']:.3g} | {r['decode_max_abs']:.3g} | {r['bound_max_abs']:.3g} "
                     f"| {r['top1']:.0%} | {'yes' if r['greedy_equal'] else 'no'} | "
                     f"{r['host_vs_emulator_max_abs']:.3g} ({r['host_vs_emulator_greedy']}) | {r['compile_s']} | "
                     f"{r['emulator_s']} |")
    lines += ["", f"Machine: {data['machine'].get('cpu', '?')}; {data['date']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--render", action="store_true")
    a = ap.parse_args()
    if a.render:
        from _common import render

        render("device")
        return
    from slmc import api

    setup = api.device_setup("qemu-arm64")
    flows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = tiny_model(work)
        for target, backend, recipe in TINY:
            flows.append(run_flow(api, tiny, "tiny-llama", target, backend, recipe, work, 48))
            print(json.dumps(flows[-1]), file=sys.stderr)
        if a.smollm2:
            flows.append(run_flow(api, api.DEFAULT_MODEL, "SmolLM2-135M", "executorch", "xnnpack",
                                  "int8da-int4w-g32", work, 128))
    write_results("device", {"setup": setup, "flows": flows, "machine": machine(),
                             "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
