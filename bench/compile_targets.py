"""Core ML, LiteRT and ONNX compile benchmark: slmc beside each ecosystem's own converter.

    SLMC_CACHE=/tmp/slmc-cache python bench/compile_targets.py [--max-seq-len 512]
    python bench/compile_targets.py --quick          # tiny random Llama, smoke test

Paths, each in a fresh subprocess (wall time, CPU time and peak RSS are its own):
  slmc coreml   api.compile(target="coreml", backend="all"): fp16, iOS 18 states, prefill +
                decode functions in one multifunction .mlpackage
  ref coreml    transformers' TorchExportableModuleForDecoderOnlyLM (static cache, T=1)
                -> torch.export -> run_decompositions -> coremltools.convert (fp16, iOS 18)
  ref coreml_prefill  (path coreml-ref_prefill) a graph coremltools accepts: transformers' model
                without a cache, one 128-token prefill (eager attention, mask and positions as
                inputs), the same export and convert: one function where slmc converts two
  slmc tflite   api.compile(target="tflite", backend="cpu"): prefill (128) + decode signatures
  ref tflite    litert_torch.generative.export_hf.export (the HF exporter litert-torch ships),
                fp32 (quantization_recipe="none"), prefill 128, same cache length, no bundle; its exporter
                imports tensorflow, which slmc's environment does not have: give it a venv
                that does with --ref-python (torch 2.13.0, litert-torch 0.10.0, tensorflow-cpu,
                transformers 5.20.2 without `kernels`): litert-torch replaces transformers'
                use_kernel_forward_from_hub, which kernels 0.19.1 (required from transformers 5.25)
                then rejects when the exporter imports gemma3; without kernels, 5.25 stopped its load
  slmc onnx     api.compile(target="onnx", backend="cpu"): fp32, and (onnx_int4) recipe int4-g32-onnx
                (int4 g32 MatMulNBits at accuracy_level=1, int8 embedding and tied head as two 4-bit planes)
  ref onnx      onnxruntime-genai's model builder, `python -m onnxruntime_genai.models.builder -i DIR -o OUT
                -p fp32|int4 -e cpu` on the same local HF folder (offline: HF_HUB_OFFLINE=1), its defaults
                (int4: its own RTN int4 with accuracy_level=4, int8 activations)
Then one subprocess times greedy decode of both .tflite files in ai_edge_litert's interpreter
(caches fed back output -> input; median of repeats), and one the ONNX folders in
onnxruntime-genai's generator (onnxruntime's CPU EP; the same runner for both converters). A path that fails records its error:
the reference converters are measured as they are, not patched.
Writes bench/results/compile_targets{,-quick}.{json,md} (`--render`: the .md again from the .json);
the results file's `notes` hold the figures of bench/README.md's paragraph on this benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _common import (RESULTS, Phases, bench_setup, busy_processes, common_args, decode_bytes, dir_bytes, machine,
                     others_seen, phase_table, prompt_ids, render, spawn, weight_count, write_results)


def worker_slmc(target: str, model: str, out: Path, L: int, ph: Phases) -> dict:
    from slmc import api

    ph("compile_model setup")
    backend = {"coreml": "all", "tflite": "cpu", "onnx": "cpu", "onnx_int4": "cpu"}[target]
    recipe = "int4-g32-onnx" if target == "onnx_int4" else None
    path, _ = api.compile(api.CompileOptions(model, target.partition("_")[0], backend, out, max_seq_len=L,
                                             recipe=recipe), progress=ph)
    ph("done")
    if target.startswith("onnx"):
        return {"artifact": str(path)}  # the folder genai loads (model.onnx + .data + genai_config.json)
    art = path / ("model.mlpackage" if target == "coreml" else "model.tflite")
    return {"artifact": str(art)}


def worker_ref_onnx(precision: str, model: str, out: Path, L: int, ph: Phases) -> dict:
    import subprocess

    ph("onnxruntime_genai.models.builder")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # the local folder only
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", model, "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    ph("done")
    if r.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()][-1:] or [f"exit {r.returncode}"]
        raise RuntimeError(f"builder -p {precision}: {tail[0]}")
    return {"artifact": str(out), "builder_args": cmd[3:]}


def worker_ref_coreml(model: str, out: Path, L: int, ph: Phases) -> dict:
    import coremltools  # noqa: F401  (imported before the first phase, as in the other paths)
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    ph("load HF model")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    hf.generation_config.use_cache, hf.generation_config.cache_implementation = True, "static"
    wrapped = TorchExportableModuleForDecoderOnlyLM(hf, batch_size=1, max_cache_len=L)
    ph("torch.export")
    with torch.no_grad():
        ep = wrapped.export(input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0]))
    return {"artifact": str(_ref_convert(ep, out, ph))}


def _ref_convert(ep, out: Path, ph: Phases, **convert_kw) -> Path:
    """The Core ML reference paths' common tail: decompositions, coremltools.convert (fp16,
    iOS 18) and the package written."""
    import coremltools as ct

    ph("run_decompositions")
    ep = ep.run_decompositions({})
    ph("coremltools.convert")
    ml = ct.convert(ep, minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                    skip_model_load=True, **convert_kw)
    ph("writing")
    art = out / "model.mlpackage"
    out.mkdir(parents=True, exist_ok=True)
    ml.save(str(art))
    ph("done")
    return art


PREFILL_T = 128  # the Core ML prefill-only reference's fixed length (litert-torch's prefill too)


def worker_ref_coreml_prefill(model: str, out: Path, L: int, ph: Phases) -> dict:
    """coremltools on a graph it accepts: transformers' model without a cache, one fixed-length
    prefill (eager attention, the causal mask and positions given, logits for every token).
    The static-cache export above stops in coremltools at index_copy; transformers' own mask
    building, without these inputs, at diff/new_ones, and logits_to_keep=0's slice at alias."""
    import coremltools as ct
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    ph("load HF model")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()
    positions = torch.arange(PREFILL_T)[None]

    class Prefill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = hf

        def forward(self, ids, mask):
            return self.lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                           logits_to_keep=PREFILL_T).logits

    ph("torch.export")
    mask = torch.triu(torch.full((1, 1, PREFILL_T, PREFILL_T), -1e4), 1)
    with torch.no_grad():
        ep = torch.export.export(Prefill().eval(), (torch.zeros(1, PREFILL_T, dtype=torch.long), mask), strict=False)
    art = _ref_convert(ep, out, ph, inputs=[
        ct.TensorType(name="ids", shape=(1, PREFILL_T), dtype=np.int32),
        ct.TensorType(name="mask", shape=(1, 1, PREFILL_T, PREFILL_T), dtype=np.float16)])
    return {"artifact": str(art), "prefill_tokens": PREFILL_T}


def worker_ref_tflite(model: str, out: Path, L: int, ph: Phases) -> dict:
    from litert_torch.generative.export_hf import export as hf_export

    ph("litert_torch export_hf")
    hf_export.export(model=model, output_dir=str(out), prefill_lengths=[128], cache_length=L,
                     quantization_recipe="none", bundle_litert_lm=False)
    ph("done")
    arts = sorted(out.rglob("*.tflite"))  # it may leave the model in its work dir under `out`
    if not arts:
        raise SystemExit(f"litert_torch wrote no .tflite into {out}: {sorted(p.name for p in out.iterdir())}")
    return {"artifact": str(arts[0])}


def worker_decode(arts: dict, ids: list[int], steps: int, repeats: int) -> dict:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    res = {}
    for name, path in arts.items():
        it = Interpreter(model_path=path, num_threads=os.cpu_count())
        run = it.get_signature_runner("decode")
        ins = run.get_input_details()
        feeds = {k: np.zeros(d["shape"], d["dtype"]) for k, d in ins.items()}
        caches = [k for k in ins if "cache" in k]
        tok_s = []
        for r in range(repeats + 1):  # repeat 0: warm-up
            for k in caches:
                feeds[k][...] = 0
            t0, tok = time.perf_counter(), ids[-1]
            for i in range(steps):  # decode from an empty cache: every step costs the same work
                feeds["tokens"][...] = tok
                feeds["input_pos"][...] = i
                out = run(**feeds)
                for k in caches:
                    feeds[k] = out[k] if k in out else feeds[k]
                tok = int(np.asarray(out["logits"]).reshape(-1)[:].argmax())
            if r:
                tok_s.append(steps / (time.perf_counter() - t0))
        res[name] = {"decode_tok_s": statistics.median(tok_s), "tok_s": tok_s,
                     "decode_inputs": {k: list(map(int, d["shape"])) for k, d in ins.items()}}
    return res


def worker_decode_onnx(arts: dict, ids: list[int], steps: int, repeats: int) -> dict:
    """Greedy decode steps in onnxruntime-genai's generator after a short prompt (each repeat a
    fresh generator); the prompt's forward pass is not timed."""
    import numpy as np
    import onnxruntime_genai as og

    res = {}
    for name, folder in arts.items():
        model = og.Model(folder)
        tok_s = []
        for r in range(repeats + 1):  # repeat 0: warm-up
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + steps, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(np.array([ids], dtype=np.int32))
            t0, n = time.perf_counter(), 0
            while n < steps and not gen.is_done():
                gen.generate_next_token()
                n += 1
            if r:
                tok_s.append(n / (time.perf_counter() - t0))
        res[name] = {"decode_tok_s": statistics.median(tok_s), "tok_s": tok_s}
    return res


def worker_main(a) -> None:
    ph = Phases()
    if a.worker == "decode":
        out = worker_decode(json.loads(a.arts), json.loads(a.prompt_ids), a.steps, a.repeats)
    elif a.worker == "decode_onnx":
        out = worker_decode_onnx(json.loads(a.arts), json.loads(a.prompt_ids), a.steps, a.repeats)
    else:
        target, who = a.worker.split("-")
        fn = (lambda *x: worker_slmc(target, *x)) if who == "slmc" else \
            {"coreml-ref": worker_ref_coreml, "coreml-ref_prefill": worker_ref_coreml_prefill,
             "tflite-ref": worker_ref_tflite, "onnx-ref": lambda *x: worker_ref_onnx("fp32", *x),
             "onnx_int4-ref": lambda *x: worker_ref_onnx("int4", *x)}[a.worker]
        try:
            out = fn(a.model, Path(a.out), a.max_seq_len, ph)
        except Exception as e:  # a converter that fails is a result, recorded with its error
            out = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:400]}
        out["phases"] = ph.rows
    Path(a.result).write_text(json.dumps(out))


def run_path(name: str, common: list[str], work: Path, python: str = sys.executable) -> dict:
    print(f"== {name} ...", flush=True)
    r = spawn(__file__, ["--worker", name, *common, "--out", str(work / name)], work / f"{name}.json", python)
    r["python"] = python
    if "error" in r:
        print(f"   failed: {r['error']}", flush=True)
        return r
    r["artifact_bytes"] = dir_bytes(Path(r["artifact"]))
    print(f"   {r['wall_s']} s, peak RSS {r['peak_rss_mib']} MiB", flush=True)
    return r


def step_bytes(name: str, x: dict, model_dir: Path, before: int, steps: int, L: int) -> int | None:
    """Bytes one decode step of path `name` reads (_common.decode_bytes): an slmc folder from its
    manifest, a fp32 reference as the same model in fp32; None for the builder's int4, whose
    storage slmc does not model."""
    if name == "onnx_int4-ref" or "error" in x:
        return None
    art = Path(x["artifact"])
    subject = (art if art.is_dir() else art.parent) if name.endswith("-slmc") else model_dir
    return decode_bytes(str(subject), {"max_seq_len": L}, max(before, 1), steps)["bytes_per_token"]


def ratio(a, b, key):
    ok = "error" not in a and "error" not in b and b.get(key)
    return a[key] / b[key] if ok else None


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Core ML, LiteRT and ONNX compile: slmc beside the reference converters ({r['model_name']})", "",
             f"{m['date']} · {m['cpu']} · {m['cores']} cores · torch {m['torch']} · max_seq_len {r['max_seq_len']} · "
             f"fp32 weights {r['fp32_weight_bytes'] / 2**20:.0f} MiB", "",
             "| path | compile wall (s) | CPU (s) | peak RSS (MiB) | artifact (MiB) | decode tok/s | "
             "bytes / decode token (MiB) | of roofline |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, x in r["paths"].items():
        if "error" in x:
            lines.append(f"| {name} | failed after {x['wall_s']:.0f} s: `{x['error']}` | | | | | | |")
            continue
        tok = f"{x['decode_tok_s']:.1f}" if "decode_tok_s" in x else "-"
        cost = f"{x['bytes_per_token'] / 2**20:.1f}" if "bytes_per_token" in x else "-"
        roof = f"{x['of_roofline']:.0%}" if "of_roofline" in x else "-"
        lines.append(f"| {name} | {x['wall_s']:.1f} | {x['cpu_s']:.1f} | {x['peak_rss_mib']:.0f} | "
                     f"{x['artifact_bytes'] / 2**20:.1f} | {tok} | {cost} | {roof} |")
    lines += ["", "| goal | measured | target | result |", "|---|---:|---:|---|"]
    for k, (val, tgt, ok) in r["goals"].items():
        lines.append(f"| {k} | {'-' if val is None else f'{val:.2f}'} | {tgt} | "
                     f"{'-' if tgt == 'measured' else 'n/a (reference failed)' if ok is None else ('PASS' if ok else 'FAIL')} |")
    lines += ["", f"Decode: median of {r['repeats']} repeats of {r['decode_steps']} greedy decode steps from an "
              "empty cache, each .tflite in ai_edge_litert's interpreter (all cores), caches fed back; each ONNX "
              "folder in onnxruntime-genai's generator after a short prompt. onnx_int4: slmc's int4-g32-onnx "
              "recipe (MatMulNBits accuracy_level=1, fp32 compute: exact) beside the builder's `-p int4` "
              "(its defaults: accuracy_level=4, int8 activations).", "",
              "coreml-ref_prefill: coremltools on a graph it accepts, transformers' model without a cache as one "
              "128-token prefill function (slmc's package has two, prefill of any length and decode, with states); "
              "coreml-ref, the static-cache export, is measured as it is.", ""]
    bws = {x["host_bandwidth"]["bandwidth_gbs"] for x in r["paths"].values() if "host_bandwidth" in x}
    if bws:
        lines += [f"Roofline: decode tok/s x the bytes a step reads (slmc's cost model, bare: every weight at its stored "
                  "bits, one embedding row, the KV cache up to the step's position, at the middle of the timed steps; "
                  "a reference in fp32 as the same model in fp32, the builder's int4 not modelled) / the host's copy "
                  f"bandwidth measured after the decode timings ({', '.join(f'{b} GB/s' for b in sorted(bws))}).", ""]
    gemms = {x["host_gemm"]["fp32_gflops"] for x in r["paths"].values() if "host_gemm" in x}
    if gemms:
        lines += [f"The host's fp32 GEMM (numpy, 2048², all cores) measured after them: "
                  f"{', '.join(f'{g} GFLOP/s' for g in sorted(gemms))}.", ""]
    for name, x in r["paths"].items():
        lines += phase_table(name, x["phases"]) if "phases" in x else []
    return "\n".join(lines + others_seen(r["other_processes"]))


def notes(r: dict) -> str | None:
    """bench/README.md's paragraph: the findings written into the results file's notes, newest
    first, each dated and naming the run its figures come from."""
    return (r.get("notes") or {}).get("text")


def main(a) -> None:
    work, model_dir = bench_setup(a, "slmc-bench-targets-")
    common = ["--model", str(model_dir), "--max-seq-len", str(a.max_seq_len)]
    others = set(busy_processes())
    stem = "compile_targets-quick" if a.quick else "compile_targets"
    paths = {}
    if a.only:  # re-measure some paths; keep the last run's others (their artifacts must still exist)
        prev = json.loads((RESULTS / f"{stem}.json").read_text())
        paths = {k: v for k, v in prev["paths"].items() if k not in a.only.split(",")}
        others |= set(prev["other_processes"])
    measured = set()
    for name in ("coreml-slmc", "coreml-ref", "coreml-ref_prefill", "tflite-slmc", "tflite-ref", *ONNX_PATHS):
        if name in paths:
            continue
        measured.add(name)
        ref_py = a.ref_python if name == "tflite-ref" and a.ref_python else sys.executable
        paths[name] = run_path(name, common, work, ref_py)
        others |= set(busy_processes())
    cfg = json.loads((model_dir / "config.json").read_text())
    # decode only what this run compiled (an --only run keeps the others' timings)
    arts = {k: paths[k]["artifact"] for k in ("tflite-slmc", "tflite-ref") if k in measured and "artifact" in paths[k]}
    if arts:
        print("== decode timing ...", flush=True)
        dec = spawn(__file__, ["--worker", "decode", "--arts", json.dumps(arts), "--prompt-ids",
                               json.dumps(prompt_ids(model_dir, cfg["vocab_size"])), "--steps", str(a.steps),
                               "--repeats", str(a.repeats)], work / "decode.json", rusage=False)
        for k in arts:
            v = dec[k]
            paths[k].update(decode_tok_s=v["decode_tok_s"], decode_tok_s_all=v["tok_s"], decode_inputs=v["decode_inputs"])
    arts = {k: paths[k]["artifact"] for k in ONNX_PATHS if k in measured and "artifact" in paths[k]}
    if arts:
        print("== decode timing (onnxruntime-genai) ...", flush=True)
        dec = spawn(__file__, ["--worker", "decode_onnx", "--arts", json.dumps(arts), "--prompt-ids",
                               json.dumps(prompt_ids(model_dir, cfg["vocab_size"])), "--steps", str(a.steps),
                               "--repeats", str(a.repeats)], work / "decode_onnx.json", rusage=False)
        for k in arts:
            paths[k].update(decode_tok_s=dec[k]["decode_tok_s"], decode_tok_s_all=dec[k]["tok_s"])
    decoded = [k for k in paths if k in measured and "decode_tok_s" in paths[k]]
    if decoded:  # the memory roofline of each decode timed in this run (issue 17, item 5)
        sys.path.insert(0, str(Path(__file__).parent))
        from estimate import host_bandwidth, host_gemm

        # the compute side too: a decode bound by dequantizing (int4 at fp32 compute) follows
        # the host's arithmetic speed, which moved more between runs than its bandwidth
        bw, gemm = host_bandwidth(), host_gemm()
        for k in decoded:
            paths[k]["host_gemm"] = gemm
            steps_before = 0 if k.startswith("tflite") else len(prompt_ids(model_dir, cfg["vocab_size"]))
            cost = step_bytes(k, paths[k], model_dir, steps_before, a.steps, a.max_seq_len)
            if cost is not None:
                paths[k].update(bytes_per_token=cost, host_bandwidth=bw,
                                of_roofline=round(paths[k]["decode_tok_s"] * cost / (bw["bandwidth_gbs"] * 1e9), 3))
    fp32 = weight_count(model_dir) * 4
    goals = {}
    for t in ("coreml", "tflite"):
        s, f = paths[f"{t}-slmc"], paths[f"{t}-ref"]
        w = ratio(s, f, "wall_s")
        goals[f"{t}: slmc wall / reference wall"] = (w, "≤ 0.5", None if w is None else w <= 0.5)
        rss = s["peak_rss_mib"] * 2**20 / fp32 if "error" not in s else None
        goals[f"{t}: slmc peak RSS / fp32 weight bytes"] = (rss, "≤ 1.5", None if rss is None else rss <= 1.5)
    if "coreml-ref_prefill" in paths:  # absent from results written before it was measured
        w = ratio(paths["coreml-slmc"], paths["coreml-ref_prefill"], "wall_s")
        goals["coreml: slmc wall / prefill-only reference wall"] = (w, "≤ 0.5", None if w is None else w <= 0.5)
        w = ratio(paths["coreml-slmc"], paths["coreml-ref_prefill"], "peak_rss_mib")
        goals["coreml: slmc peak RSS / prefill-only reference's"] = (w, "measured", None)
    d = ratio(paths["tflite-slmc"], paths["tflite-ref"], "decode_tok_s")
    goals["tflite: slmc decode tok/s / reference"] = (d, "≥ 1.2", None if d is None else d >= 1.2)
    s, f = paths["tflite-slmc"], paths["tflite-ref"]
    if "of_roofline" in s:
        goals["tflite: slmc decode / roofline"] = (s["of_roofline"], "≥ 0.8", s["of_roofline"] >= 0.8)
    if "of_roofline" in f:
        goals["tflite: reference decode / roofline"] = (f["of_roofline"], "measured", None)
        goals["tflite: 1.2x the reference's decode, as a fraction of roofline"] = (
            round(1.2 * f["of_roofline"] * s.get("bytes_per_token", f["bytes_per_token"]) / f["bytes_per_token"], 3),
            "measured", None)
    for t in ("onnx", "onnx_int4"):  # issue 19: measured beside the builder, no goal set there
        s, f = paths[f"{t}-slmc"], paths[f"{t}-ref"]
        for key, what in (("wall_s", "wall"), ("decode_tok_s", "decode tok/s")):
            v = ratio(s, f, key)
            goals[f"{t}: slmc {what} / builder"] = (v, "measured", None)
    r = {"model_name": "tiny random llama (--quick)" if a.quick else cfg.get("_name_or_path") or model_dir.name,
         "max_seq_len": a.max_seq_len, "fp32_weight_bytes": fp32, "machine": machine(), "paths": paths,
         "goals": goals, "decode_steps": a.steps, "repeats": a.repeats, "other_processes": sorted(others)}
    write_results(stem, r)


ONNX_PATHS = ("onnx-slmc", "onnx-ref", "onnx_int4-slmc", "onnx_int4-ref")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, steps=32, repeats=3)
    ap.add_argument("--render", action="store_true", help="only re-render results/*.md from the .json")
    ap.add_argument("--ref-python", default=None,
                    help="python of a venv with tensorflow for litert-torch's HF exporter (which imports it)")
    ap.add_argument("--only", default="", help="comma-separated paths to re-measure (e.g. tflite-slmc); "
                    "the others come from the last results file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    [ap.add_argument(k, help=argparse.SUPPRESS) for k in ("--out", "--result", "--arts", "--prompt-ids")]
    args = ap.parse_args()
    if args.max_seq_len is None:
        args.max_seq_len = 128 if args.quick else 512
    render("compile_targets") if args.render else worker_main(args) if args.worker else main(args)
