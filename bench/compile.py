"""Compile benchmark: slmc vs. transformers' ExecuTorch export recipe, side by side.

    . .venv/bin/activate
    SLMC_CACHE=/tmp/slmc-cache python bench/compile.py [--max-seq-len 512] [--model default]
    python bench/compile.py --quick        # tiny random Llama, smoke test in ~1 min

Measures, for the same HF folder (fp32) and the same max_seq_len:
 (a) slmc: `api.compile(CompileOptions(..., target="executorch", backend="xnnpack"))` -> .pte;
 (b) reference: transformers `TorchExportableModuleForDecoderOnlyLM` (static cache, batch 1)
     -> torch.export (T dynamic) -> `to_edge_transform_and_lower([XnnpackPartitioner()])`
     -> `.to_executorch()` (same ExecutorchBackendConfig as slmc) -> .pte.
Each compile runs in its own fresh subprocess: wall time and peak RSS (os.wait4 ru_maxrss)
are per path; the workers also log per-phase time and peak RSS so far. Then one fresh
subprocess loads both .pte files in executorch.runtime (pybindings), prefills a fixed
~16-token prompt and times greedy single-token decode steps (median over repeats,
alternating the two programs), and checks both produce the same greedy tokens.
Writes bench/results/compile{,-quick}.json and .md (`--render`: the .md again from the .json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _common import (RESULTS, Phases, bench_setup, busy_processes, common_args, machine, others_seen, phase_table,
                     prompt_ids, render, spawn, weight_count, write_results)


def _backend_config():
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    return ExecutorchBackendConfig(extract_delegate_segments=True,
                                   memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                                   sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())


def worker_slmc(model: str, out: Path, max_seq_len: int, ph: Phases) -> dict:
    from slmc import api

    ph("compile_model setup")  # slmc imports torch/executorch lazily, inside its phases
    path, manifest = api.compile(api.CompileOptions(model, "executorch", "xnnpack", out, max_seq_len=max_seq_len),
                                 progress=ph)
    ph("done")
    return {"pte": str(path / "model.pte"), "params": manifest["model"]["params"]}


def worker_ref(model: str, out: Path, max_seq_len: int, ph: Phases) -> dict:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from torch.export import Dim
    from transformers import AutoModelForCausalLM
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    ph("load HF model")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    hf.generation_config.use_cache = True
    hf.generation_config.cache_implementation = "static"
    params = sum(p.numel() for p in hf.parameters())
    wrapped = TorchExportableModuleForDecoderOnlyLM(hf, batch_size=1, max_cache_len=max_seq_len)
    ph("torch.export")
    seq = Dim("seq_len", max=max_seq_len - 1)  # as slmc: T dynamic in 1..max_len-1
    ids = torch.tensor([[1, 2]], dtype=torch.long)
    with torch.no_grad():
        ep = wrapped.export(input_ids=ids, cache_position=torch.arange(2, dtype=torch.long),
                            dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}})
    del wrapped, hf
    ph("to_edge + xnnpack partitioning")
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    del ep
    ph("to_executorch")
    prog = edge.to_executorch(_backend_config())
    ph("writing")
    out.mkdir(parents=True, exist_ok=True)
    pte = out / "model.pte"
    pte.write_bytes(prog.buffer)
    ph("done")
    return {"pte": str(pte), "params": params}


def worker_decode(ptes: dict, prompt_ids: list[int], steps: int, repeats: int) -> dict:
    import torch
    from executorch.runtime import Runtime

    rt, progs, res = Runtime.get(), {}, {}
    for name, pte in ptes.items():
        ptd = Path(pte).with_name("model.ptd")  # slmc keeps a tied float table beside the .pte
        progs[name] = rt.load_program(pte, data_path=str(ptd) if ptd.is_file() else None)
        meta = progs[name].metadata("forward")
        res[name] = {"signature": [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())],
                     "tok_s": [], "prefill_ms": []}

    def call(name, method, toks, pos):
        t = torch.tensor([toks], dtype=torch.int64)
        if name == "reference":  # (input_ids[1,T], cache_position[T])
            p = torch.arange(pos, pos + len(toks), dtype=torch.int64)
        else:  # slmc: (tokens[1,T], input_pos[1])
            p = torch.tensor([pos], dtype=torch.int64)
        out = method.execute([t, p])[0]
        return int(out.reshape(-1, out.shape[-1])[-1].argmax())

    for r in range(repeats + 1):  # repeat 0 is a warm-up (first-run page faults, thread spin-up)
        for name in ptes:
            method = progs[name].load_method("forward")  # fresh method: empty KV cache
            t0 = time.perf_counter()
            tok = call(name, method, prompt_ids, 0)
            t1 = time.perf_counter()
            toks, pos = [tok], len(prompt_ids)
            for _ in range(steps):
                tok = call(name, method, [tok], pos)
                toks.append(tok)
                pos += 1
            t2 = time.perf_counter()
            if r == 0:
                res[name]["greedy"] = toks
            else:
                res[name]["tok_s"].append(steps / (t2 - t1))
                res[name]["prefill_ms"].append((t1 - t0) * 1000)
    for v in res.values():
        v["decode_tok_s"] = statistics.median(v["tok_s"])
        v["prefill_ms_median"] = statistics.median(v["prefill_ms"])
    return res


def worker_main(a) -> None:
    ph = Phases()
    if a.worker == "decode":
        out = worker_decode(json.loads(a.ptes), json.loads(a.prompt_ids), a.steps, a.repeats)
    else:
        fn = worker_slmc if a.worker == "slmc" else worker_ref
        out = fn(a.model, Path(a.out), a.max_seq_len, ph)
        out["phases"] = ph.rows
    Path(a.result).write_text(json.dumps(out))


def markdown(r: dict) -> str:
    s, f, m, g = r["slmc"], r["reference"], r["machine"], r["goals"]
    yn = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lines = [f"# Compile benchmark: slmc vs transformers ExecuTorch recipe ({r['model_name']})", "",
             f"{m['date']} · {m['cpu']} · {m['cores']} cores · {m['mem_gib']} GiB · torch {m['torch']} · "
             f"executorch {m['executorch']} · transformers {m['transformers']} · max_seq_len {r['max_seq_len']} · "
             f"params {r['params']:,} (fp32 weights {r['fp32_weight_bytes'] / 2**20:.0f} MiB)", "",
             "| path | compile wall (s) | compile CPU (s) | peak RSS (MiB) | .pte (MiB) | decode tok/s "
             "| prefill 16 tok (ms) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, x in (("slmc", s), ("reference (transformers)", f)):
        lines.append(f"| {name} | {x['wall_s']:.1f} | {x.get('cpu_s', float('nan')):.1f} | {x['peak_rss_mib']:.0f} | "
                     f"{x['pte_bytes'] / 2**20:.1f} | "
                     f"{x['decode_tok_s']:.1f} | {x['prefill_ms']:.1f} |")
    lines += ["", "| goal | measured | target | result |", "|---|---:|---:|---|"]
    for k, (val, tgt, ok) in g.items():
        lines.append(f"| {k} | {val:.2f} | {tgt} | {yn(ok)} |")
    lines += [f"| {k} (info) | {v:.2f} | | |" for k, v in r["info"].items()]
    a = r["greedy"]
    lines += ["", f"Greedy tokens ({len(a['slmc'])}: prefill + {r['decode_steps']} decode steps) agree: "
              f"**{a['agree']}** (common prefix {a['common_prefix']}).",
              f"Decode: median of {r['repeats']} repeats of {r['decode_steps']} greedy steps after a "
              f"{len(r['prompt_ids'])}-token prefill, both programs in one executorch.runtime process.", ""]
    for name in ("slmc", "reference"):
        lines += phase_table(name, r[name]["phases"])
    return "\n".join(lines + others_seen(r["other_processes"]))


def notes(r: dict) -> str | None:
    """bench/README.md's paragraph: the results file's notes text (what the run found), then an
    earlier full run kept there."""
    text, e = (r.get("notes") or {}).get("text", ""), (r.get("notes") or {}).get("earlier_run")
    if not e:
        return text or None
    s, f = e["slmc"], e["reference"]
    return (f"{text} " if text else "") + (f"Earlier full run (finished {e['date']}, less contention during the slmc compile, heavy during "
            f"the reference): slmc {s['wall_s']:.1f} s wall / {s['peak_rss_mib']:.0f} MiB peak RSS; reference "
            f"{f['wall_s']:.1f} s / {f['peak_rss_mib']:.0f} MiB; decode {s['decode_tok_s']:.1f} vs "
            f"{f['decode_tok_s']:.1f} tok/s (noisy); greedy tokens {'agreed' if e['greedy_agree'] else 'differed'}.")


def main(a) -> None:
    work, model_dir = bench_setup(a, "slmc-bench-")
    cfg = json.loads((model_dir / "config.json").read_text())
    common = ["--model", str(model_dir), "--max-seq-len", str(a.max_seq_len)]
    others: set[str] = set(busy_processes())
    stem = "compile-quick" if a.quick else "compile"
    res: dict = {}
    if a.decode_only:  # re-time decode of the .pte files a previous full run left behind
        prev = json.loads((RESULTS / f"{stem}.json").read_text())
        res = {k: prev[k] for k in ("slmc", "reference")}
        others |= set(prev["other_processes"])
    for name in () if a.decode_only else ("slmc", "reference"):
        print(f"== compiling with {name} ...", flush=True)
        load = os.getloadavg()[0]
        res[name] = spawn(__file__, ["--worker", "slmc" if name == "slmc" else "ref", *common,
                                     "--out", str(work / name)], work / f"{name}.json")
        ptd = Path(res[name]["pte"]).with_name("model.ptd")  # counted with the .pte: one program's weights
        res[name].update(pte_bytes=Path(res[name]["pte"]).stat().st_size + (ptd.stat().st_size if ptd.is_file() else 0),
                         loadavg_1m_before=load)
        others |= set(busy_processes())
        print(f"   {name}: {res[name]['wall_s']} s, peak RSS {res[name]['peak_rss_mib']} MiB", flush=True)
    ids = prompt_ids(model_dir, cfg["vocab_size"])
    print("== decode timing ...", flush=True)
    load = os.getloadavg()[0]
    ptes = json.dumps({k: res[k]["pte"] for k in ("slmc", "reference")})
    dec = spawn(__file__, ["--worker", "decode", "--ptes", ptes, "--prompt-ids", json.dumps(ids), "--steps",
                           str(a.steps), "--repeats", str(a.repeats)], work / "decode.json", rusage=False)
    others |= set(busy_processes())
    for k in ("slmc", "reference"):
        res[k].update(decode_tok_s=dec[k]["decode_tok_s"], decode_tok_s_all=dec[k]["tok_s"],
                      prefill_ms=dec[k]["prefill_ms_median"], forward_inputs=dec[k]["signature"],
                      decode_loadavg_1m_before=load)
    gs, gr = dec["slmc"]["greedy"], dec["reference"]["greedy"]
    prefix = next((i for i, (x, y) in enumerate(zip(gs, gr)) if x != y), min(len(gs), len(gr)))
    params = weight_count(model_dir)
    fp32 = params * 4
    s, f = res["slmc"], res["reference"]
    r = {"model_name": "tiny random llama (--quick)" if a.quick else cfg.get("_name_or_path") or model_dir.name,
         "model_dir": str(model_dir), "max_seq_len": a.max_seq_len, "params": params, "fp32_weight_bytes": fp32,
         "machine": machine(), "decode_steps": a.steps, "repeats": a.repeats, "prompt_ids": ids,
         "slmc": s, "reference": f,
         "greedy": {"slmc": gs, "reference": gr, "agree": gs == gr, "common_prefix": prefix},
         "goals": {"slmc wall / reference wall": (s["wall_s"] / f["wall_s"], "≤ 0.5",
                                                  s["wall_s"] <= 0.5 * f["wall_s"]),
                   "slmc peak RSS / fp32 weight bytes": (s["peak_rss_mib"] * 2**20 / fp32, "≤ 1.5",
                                                        s["peak_rss_mib"] * 2**20 <= 1.5 * fp32),
                   "slmc decode tok/s / reference": (s["decode_tok_s"] / f["decode_tok_s"], "≥ 1.2",
                                                     s["decode_tok_s"] >= 1.2 * f["decode_tok_s"])},
         "info": {"slmc CPU s / reference CPU s (compile)": s["cpu_s"] / f["cpu_s"]} if "cpu_s" in s else {},
         "other_processes": sorted(others)}
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        r["greedy"]["slmc_text"] = Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(gs)
    write_results(stem, r)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, steps=64, repeats=5)
    ap.add_argument("--render", action="store_true", help="only re-render results/*.md from the .json")
    ap.add_argument("--decode-only", action="store_true", help="re-time decode of the last run's .pte files")
    ap.add_argument("--worker", choices=("slmc", "ref", "decode"), help=argparse.SUPPRESS)
    [ap.add_argument(k, help=argparse.SUPPRESS) for k in ("--out", "--result", "--ptes", "--prompt-ids")]
    args = ap.parse_args()
    if args.max_seq_len is None:
        args.max_seq_len = 128 if args.quick else 512
    render("compile") if args.render else worker_main(args) if args.worker else main(args)
