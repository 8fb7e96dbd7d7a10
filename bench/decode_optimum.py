"""Decode side by side: slmc's int8da-int4w-g32 .pte against optimum-executorch's 8da4w +
8-bit-embedding .pte, both in ExecuTorch's stock TextLLMRunner (issue 17, item 5).

    SLMC_CACHE=/tmp/slmc-cache python bench/decode_optimum.py     # SmolLM2-135M-Instruct
    python bench/decode_optimum.py --quick                        # tiny random Llama, smoke test
    python bench/decode_optimum.py --render

1. optimum-executorch lives in its own venv (--opt-venv; made when missing: torch 2.13.0 CPU,
   this venv's executorch, optimum-executorch OPT_VERSION, which pins transformers 5.0.0rc1
   where slmc has its own). Its versions are recorded in the results.
2. Both exports start from the same HF folder (the default model, fp32) at the same max_seq_len,
   each in a fresh process (wall, CPU, peak RSS by os.wait4): slmc `api.compile(recipe
   int8da-int4w-g32)`; optimum `main_export(recipe xnnpack, qlinear 8da4w, qembedding 8w)`,
   its README's phone recipe, offline. Without its custom SDPA / KV-cache ops: the pip
   ExecuTorch runtime has no kernels for them (../shared/FACTS.md), so neither artifact uses them.
3. One process loads both into TextLLMRunner and times greedy generation of the same raw
   prompt: one warm-up each, then --repeats rounds alternating which goes first; the median of
   the runner's own stats (prefill and decode tok/s) counts. Generation stops at --new-tokens
   or an EOS, so the token counts are recorded too.
4. Roofline: the host's copy bandwidth (bench/estimate.py's probe, read + write bytes) measured
   in the same process, and the bytes one decode step must read at the middle position of the
   measured generation, from slmc's cost model (api.estimate, bare): slmc's artifact from its
   manifest, optimum's from its flags written as the same storage (int4 g32 linears and head with
   int8 activations, int8 embedding rows; its scales' dtype as its quantizer stores them).
   fraction = decode tok/s x bytes per token / bandwidth.
5. Why a step is short of its roofline: the same decode again in a process held to one core.
   One thread copies at about the host's bandwidth here, so a step bound by memory bandwidth
   gains little from the second core and one bound by compute up to 2x.
Goals (issue 17): slmc decodes faster than optimum-executorch's artifact (keep the lead), and
each decode at >= 80 % of its roofline. Writes bench/results/decode_optimum{,-quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import (RESULTS, bench_setup, busy_processes, decode_bytes, dir_bytes, head_commit, machine, others_seen,
                     render, spawn, write_results)

OPT_VERSION = "1.1.0"
OPT_FLAGS = {"recipe": "xnnpack", "qlinear": "8da4w", "qlinear_group_size": 32, "qembedding": "8w"}
# optimum's flags as slmc storage, for the cost model only (never compiled): torchao's intx
# quantizer keeps float32 scales by default; the embedding is per row (group 0) and one row is
# read per token, so its scale layout does not move the bytes
OPT_STORAGE = "quant.rtn:bits=4,group_size=32,scale_dtype=float32,act_bits=8,embed_bits=8,head_bits=4"
RECIPE = "int8da-int4w-g32"
# Prose to continue (raw text, no chat turn): an instruct model answering a question may stop
# after a few tokens (an EOS), and decode speed compared over a handful of tokens at different
# positions says little. A run counts only if it generated at least MIN_SHARE of --new-tokens.
PROMPT = ("Chapter One\n\nThe lighthouse keeper had not spoken to anyone for eleven days when the boat appeared "
          "on the grey water. She watched it from the gallery, counting the strokes of the oars, and wondered who "
          "would row so far in such weather. By the time it reached the rocks")
MIN_SHARE = 0.9
GOAL_LEAD, GOAL_ROOFLINE = 1.0, 0.80


# ------------------------------------------------------------------ optimum's venv


def ensure_venv(venv: Path) -> Path:
    """The optimum-executorch venv's python, made on first use (pip from PyPI)."""
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([py, "-c", "import optimum.exporters.executorch"],
                                       capture_output=True).returncode == 0:
        return py
    from importlib import metadata

    et = metadata.version("executorch")
    print(f"== making {venv} (optimum-executorch {OPT_VERSION}, executorch {et}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # alone first: keeps pip off the CUDA build
    subprocess.run(pip + [f"executorch=={et}", f"optimum-executorch=={OPT_VERSION}"], check=True)
    return py


def venv_versions(py: Path) -> dict:
    code = ("import json; from importlib import metadata as m; print(json.dumps({k: m.version(k) for k in "
            "('optimum-executorch', 'optimum', 'transformers', 'torch', 'torchao', 'executorch')}))")
    return json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)


# ------------------------------------------------------------------ workers


def worker_slmc(a) -> dict:
    from slmc import api

    path, manifest = api.compile(api.CompileOptions(a.model, "executorch", "xnnpack", Path(a.out), recipe=RECIPE,
                                                    max_seq_len=int(a.max_seq_len)))
    return {"pte": str(path / manifest["artifact"]), "folder": str(path)}


def worker_optimum(a) -> dict:
    """Runs in optimum's venv: its own exporter, offline, from the same folder."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from optimum.exporters.executorch import main_export

    main_export(model_name_or_path=a.model, task="text-generation", output_dir=a.out, local_files_only=True,
                max_seq_len=int(a.max_seq_len), **OPT_FLAGS)
    pte = sorted(Path(a.out).glob("*.pte"))
    if len(pte) != 1:
        raise SystemExit(f"optimum-executorch wrote {[p.name for p in pte]} in {a.out}; expected one .pte")
    return {"pte": str(pte[0])}


def _ptd(pte: str) -> Path | None:
    """The program's external weights file (model.pte -> model.ptd), if it has one."""
    d = Path(pte).with_suffix(".ptd")
    return d if d.is_file() else None


def _model_bytes(pte: str) -> int:
    return Path(pte).stat().st_size + (_ptd(pte).stat().st_size if _ptd(pte) else 0)


def worker_decode(a) -> dict:
    """Both programs in one TextLLMRunner process, alternating; the host's bandwidth after.
    --cores N: the process is held to its first N cores before anything starts a thread, so
    the runtime's thread pool (made on first use) inherits that."""
    if a.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:int(a.cores)])
    import executorch.kernels.quantized  # noqa: F401  registers the quantized kernels
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    sys.path.insert(0, str(Path(__file__).parent))
    from estimate import host_bandwidth, host_gemm

    arts = json.loads(a.artifacts)
    # a program whose weights are in a .ptd beside it (slmc's: named data, a tied table once) is
    # loaded with that file as its data path
    runners = {k: TextLLMRunner(v, a.tokenizer, *[str(d) for d in [_ptd(v)] if d]) for k, v in arts.items()}
    cfg = GenerationConfig(echo=False, max_new_tokens=int(a.new_tokens), temperature=0.0, num_bos=0, warming=True)

    def once(k: str) -> dict:
        got, pieces = {}, []

        def on_stats(s):
            got.update(prompt_tokens=s.num_prompt_tokens, generated_tokens=s.num_generated_tokens,
                       prefill_ms=s.prompt_eval_end_ms - s.inference_start_ms,
                       decode_ms=s.inference_end_ms - s.prompt_eval_end_ms)

        runners[k].reset()
        runners[k].generate(PROMPT, cfg, token_callback=pieces.append, stats_callback=on_stats)
        # the runner counts the first token (from prefill) among the generated ones; the decode
        # phase made the rest
        got["prefill_tok_s"] = got["prompt_tokens"] / max(got["prefill_ms"], 1e-3) * 1e3
        got["decode_tok_s"] = (got["generated_tokens"] - 1) / max(got["decode_ms"], 1e-3) * 1e3
        got["text"] = "".join(pieces)
        return got

    runs: dict[str, list] = {k: [] for k in arts}
    for k in arts:  # warm-up
        once(k)
    order = list(arts)
    for r in range(int(a.repeats)):
        for k in (order if r % 2 == 0 else order[::-1]):
            runs[k].append(once(k))
    # int4 GEMV on this host is bound by arithmetic (all / one core 1.98, results/decode_optimum.md):
    # its rate beside the bandwidth
    return {"runs": runs, "host_bandwidth": host_bandwidth(), "host_gemm": host_gemm()}


# ------------------------------------------------------------------ main


def main(a) -> None:
    work, model = bench_setup(a, "slmc-decode-opt-")
    if a.work:  # kept between runs: --reuse times the exports already made there again
        work = Path(a.work)
        work.mkdir(parents=True, exist_ok=True)
    stem = "decode_optimum-quick" if a.quick else "decode_optimum"
    py = ensure_venv(Path(a.opt_venv))
    others = set(busy_processes())
    common = ["--model", str(model), "--max-seq-len", str(a.max_seq_len)]
    def export(name: str, **kw) -> dict:
        res = work / f"{name}.json"
        if a.reuse and res.is_file():
            print(f"== {name}: reusing {res}", flush=True)
            return {**json.loads(res.read_text()), "reused": True}
        print(f"== {name} export ...", flush=True)
        r = spawn(__file__, ["--worker", name, "--out", str(work / name), *common], work / f"{name}.part.json", **kw)
        res.write_text(json.dumps(r))  # with its wall, CPU and RSS, so --reuse reports the same export
        print(f"   {r['wall_s']:.0f} s, {r['peak_rss_mib']:.0f} MiB", flush=True)
        return r

    s = export("slmc")
    o = export("optimum", python=str(py), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    others |= set(busy_processes())
    print("== decode ...", flush=True)
    arts = {"slmc": s["pte"], "optimum-executorch": o["pte"]}
    d = spawn(__file__, ["--worker", "decode", "--artifacts", json.dumps(arts), "--tokenizer",
                         str(Path(model) / "tokenizer.json"), "--new-tokens", str(a.new_tokens),
                         "--repeats", str(a.repeats)], work / "decode.json")
    others |= set(busy_processes())
    # the same decode held to one core: a step bound by memory bandwidth gains little from a
    # second core when one thread alone copies at the host's bandwidth (host_bandwidth's
    # 1-thread figure); a step bound by compute gains up to 2x
    print("== decode on one core ...", flush=True)
    d1 = spawn(__file__, ["--worker", "decode", "--artifacts", json.dumps(arts), "--tokenizer",
                          str(Path(model) / "tokenizer.json"), "--new-tokens", str(a.new_tokens),
                          "--repeats", str(a.repeats), "--cores", "1"], work / "decode1.json")
    others |= set(busy_processes())
    bw = d["host_bandwidth"]["bandwidth_gbs"]
    rows = {}
    for k, exp in (("slmc", s), ("optimum-executorch", o)):
        runs = d["runs"][k]
        last = runs[-1]
        cost = (decode_bytes(s["folder"], {}, last["prompt_tokens"], last["generated_tokens"]) if k == "slmc" else
                decode_bytes(str(model), {"passes": (OPT_STORAGE,), "max_seq_len": a.max_seq_len},
                             last["prompt_tokens"], last["generated_tokens"]))
        tok = statistics.median(r["decode_tok_s"] for r in runs)
        tok1 = statistics.median(r["decode_tok_s"] for r in d1["runs"][k])
        full = all(r["generated_tokens"] >= MIN_SHARE * a.new_tokens for r in runs)
        rows[k] = {"export_wall_s": exp["wall_s"], "export_cpu_s": exp["cpu_s"], "export_peak_rss_mib": exp["peak_rss_mib"],
                   "export_reused": bool(exp.get("reused")),
                   "pte_bytes": _model_bytes(exp["pte"]), "folder_bytes": dir_bytes(Path(exp["pte"]).parent),
                   "decode_tok_s": round(tok, 2), "prefill_tok_s": round(statistics.median(r["prefill_tok_s"] for r in runs), 1),
                   "decode_tok_s_all": [round(r["decode_tok_s"], 2) for r in runs],
                   "prompt_tokens": last["prompt_tokens"], "generated_tokens": [r["generated_tokens"] for r in runs],
                   "full_length": full, "text": last["text"][:200], **cost,
                   "decode_tok_s_1core": round(tok1, 2),
                   "decode_tok_s_1core_all": [round(r["decode_tok_s"], 2) for r in d1["runs"][k]],
                   "gbs_1core": round(tok1 * cost["bytes_per_token"] / 1e9, 2),
                   "roofline_tok_s": round(bw * 1e9 / cost["bytes_per_token"], 1),
                   "of_roofline": round(tok * cost["bytes_per_token"] / (bw * 1e9), 3)}
    write_results(stem, {
        "machine": machine(), "slmc_commit": head_commit(),
        "model": str(a.model if not a.quick else "tiny random Llama"), "max_seq_len": a.max_seq_len,
        "new_tokens": a.new_tokens, "repeats": a.repeats, "prompt": PROMPT, "recipe": RECIPE,
        "optimum_flags": OPT_FLAGS, "optimum_storage_for_cost_model": OPT_STORAGE, "optimum_venv": venv_versions(py),
        "host_bandwidth": d["host_bandwidth"], "host_bandwidth_1core": d1["host_bandwidth"],
        "host_gemm": d.get("host_gemm"), "rows": rows,
        "lead": round(rows["slmc"]["decode_tok_s"] / rows["optimum-executorch"]["decode_tok_s"], 3),
        "other_processes": sorted(others)})


def notes(r: dict) -> str | None:
    """bench/README.md's paragraph: the findings written into the results file's notes."""
    return (r.get("notes") or {}).get("text")


def markdown(r: dict) -> str:
    m, v = r["machine"], r["optimum_venv"]
    s, o = r["rows"]["slmc"], r["rows"]["optimum-executorch"]
    lines = [f"# Decode in ExecuTorch's TextLLMRunner: slmc {r['recipe']} vs optimum-executorch 8da4w + int8 embedding", "",
             f"{m['date']} · {m['cpu']} · {m['cores']} cores · {m['mem_gib']} GiB · slmc {r['slmc_commit']} (torch "
             f"{m['torch']}, executorch {m['executorch']}, transformers {m['transformers']}) · optimum-executorch "
             f"{v['optimum-executorch']} in its own venv (optimum {v['optimum']}, transformers {v['transformers']}, "
             f"torchao {v['torchao']}, executorch {v['executorch']}) · model {Path(r['model']).name} · max_seq_len "
             f"{r['max_seq_len']} · up to {r['new_tokens']} greedy tokens · median of {r['repeats']} alternating runs "
             f"after one warm-up each · host copy bandwidth {r['host_bandwidth']['bandwidth_gbs']} GB/s"
             + (f" · fp32 GEMM {r['host_gemm']['fp32_gflops']} GFLOP/s" if r.get("host_gemm") else ""), "",
             "| artifact | export wall (s) | export CPU (s) | export peak RSS (MiB) | .pte + .ptd (MiB) | prefill tok/s | "
             "decode tok/s | runs | bytes / decode token (MiB) | roofline tok/s | of roofline |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for k, x in r["rows"].items():
        lines.append(f"| {k} | {x['export_wall_s']:.0f} | {x['export_cpu_s']:.0f} | {x['export_peak_rss_mib']:.0f} | "
                     f"{x['pte_bytes'] / 2**20:.1f} | {x['prefill_tok_s']:.0f} | {x['decode_tok_s']:.1f} | "
                     f"{', '.join(f'{t:.1f}' for t in x['decode_tok_s_all'])} | {x['bytes_per_token'] / 2**20:.1f} | "
                     f"{x['roofline_tok_s']:.0f} | {x['of_roofline']:.0%} |")
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    short = [k for k, x in r["rows"].items() if not x.get("full_length", True)]
    lead = (f"INCONCLUSIVE ({', '.join(short)} stopped at an EOS before {MIN_SHARE:.0%} of {r['new_tokens']} tokens)"
            if short else ok(r["lead"] > GOAL_LEAD))
    lines += ["", "| goal | measured | target | result |", "|---|---:|---:|---|",
              f"| slmc decode / optimum-executorch decode | {r['lead']:.2f} | > {GOAL_LEAD} | {lead} |",
              f"| slmc export wall / optimum-executorch export wall | {s['export_wall_s'] / o['export_wall_s']:.2f} | ≤ 0.5 | "
              f"{ok(s['export_wall_s'] <= 0.5 * o['export_wall_s'])} |",
              f"| slmc export CPU / optimum-executorch export CPU (info: walls stretch under other load) | "
              f"{s['export_cpu_s'] / o['export_cpu_s']:.2f} | | |"]
    for k, x in r["rows"].items():
        lines.append(f"| {k} decode / roofline | {x['of_roofline']:.2f} | ≥ {GOAL_ROOFLINE} | "
                     f"{ok(x['of_roofline'] >= GOAL_ROOFLINE)} |")
    if all("decode_tok_s_1core" in x for x in r["rows"].values()):
        b1 = r["host_bandwidth_1core"]["copy_gbs_1thread"]
        lines += ["", f"The same decode held to one core (median of {r['repeats']}; one thread there copies at {b1} GB/s, "
                  f"{b1 / r['host_bandwidth']['bandwidth_gbs']:.0%} of the host's best): a step bound by memory bandwidth "
                  "would gain little from the second core, one bound by compute up to 2x.", "",
                  "| artifact | decode tok/s, all cores | one core | all / one | bytes read / s on one core (GB/s) |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {x['decode_tok_s']:.1f} | {x['decode_tok_s_1core']:.1f} | "
                  f"{x['decode_tok_s'] / x['decode_tok_s_1core']:.2f} | {x['gbs_1core']:.1f} |" for k, x in r["rows"].items()]
    if any(x.get("export_reused") for x in r["rows"].values()):
        lines += ["", "The export figures come from an earlier invocation of this script on the same exports (--reuse); "
                  "the decode ran again."]
    lines += ["", "Roofline: the host's copy bandwidth over the bytes a decode step reads at the middle of the measured "
              "generation (slmc's cost model: every weight of the path at its stored bits, one embedding row, the KV "
              "cache up to the position), so 100 % would be a step that only streams its weights once.", "",
              "Storage each cost was computed for:", ""]
    for k, x in r["rows"].items():
        st = x["storage"]
        lines.append(f"- {k}: linears {st['linear']}; embedding {st['embedding']}; head {st['head']}; "
                     f"KV {st['kv_bits']}-bit; decode position {x['position']}")
    lines += ["", f"optimum-executorch's flags: `{json.dumps(r['optimum_flags'])}` (no custom SDPA / KV-cache ops: the pip "
              "runtime lacks their kernels). Prompt (raw, no chat template, no BOS): "
              f"\"{r['prompt']}\"; generated tokens per run: slmc {s['generated_tokens']}, optimum-executorch "
              f"{o['generated_tokens']}.", "", "Text (last run, first 200 characters):", ""]
    lines += [f"- {k}: {json.dumps(x['text'])}" for k, x in r["rows"].items()]
    return "\n".join(lines + [""] + others_seen(r["other_processes"]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="HF folder, or 'default' (SmolLM2-135M-Instruct)")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per run (stops early at an EOS)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--opt-venv", default="/tmp/optvenv", help="optimum-executorch's own venv (made when missing)")
    ap.add_argument("--work", help="keep the exports in this folder (default: a new temporary one)")
    ap.add_argument("--reuse", action="store_true", help="with --work: time the exports made there before again")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, smoke test")
    ap.add_argument("--render", action="store_true", help="only re-render results/decode_optimum*.md from the .json")
    ap.add_argument("--worker", choices=("slmc", "optimum", "decode"), help=argparse.SUPPRESS)
    for k in ("--out", "--result", "--artifacts", "--tokenizer", "--cores"):
        ap.add_argument(k, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.render:
        render("decode_optimum")
    elif a.worker:
        fn = {"slmc": worker_slmc, "optimum": worker_optimum, "decode": worker_decode}[a.worker]
        Path(a.result).write_text(json.dumps(fn(a)))
    else:
        main(a)
