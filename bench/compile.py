"""Compile benchmark: slmc vs. transformers' ExecuTorch export recipe, side by side.

    . .venv/bin/activate
    SLMC_CACHE=/tmp/slmc-cache python bench/compile.py [--max-seq-len 512] [--model default]
    python bench/compile.py --quick        # tiny random Llama, smoke test in ~1 min

Measures, for the same HF folder (fp32) and the same max_seq_len:
 (a) slmc: `compile_model(..., target="executorch", backend="xnnpack")` -> .pte;
 (b) reference: transformers `TorchExportableModuleForDecoderOnlyLM` (static cache, batch 1)
     -> torch.export (T dynamic) -> `to_edge_transform_and_lower([XnnpackPartitioner()])`
     -> `.to_executorch()` (same ExecutorchBackendConfig as slmc) -> .pte.
Each compile runs in its own fresh subprocess: wall time and peak RSS (os.wait4 ru_maxrss)
are per path; the workers also log per-phase time and peak RSS so far. Then one fresh
subprocess loads both .pte files in executorch.runtime (pybindings), prefills a fixed
~16-token prompt and times greedy single-token decode steps (median over repeats,
alternating the two programs), and checks both produce the same greedy tokens.
Writes bench/results/compile{,-quick}.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "The quick brown fox jumps over the lazy dog. Write a short story about a robot who"


def _rss_mb() -> float:  # peak RSS of this process so far (Linux: KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Phases:
    def __init__(self):
        self.t0 = self.last = time.perf_counter()
        self.name, self.rows = "startup+imports", []

    def __call__(self, name: str):
        now = time.perf_counter()
        self.rows.append({"phase": self.name, "seconds": round(now - self.last, 2),
                          "peak_rss_mb_after": round(_rss_mb(), 1)})
        self.name, self.last = name, now


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
    path, manifest = api.compile_model(model, "executorch", "xnnpack", out, max_seq_len=max_seq_len,
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
        progs[name] = rt.load_program(pte)
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


def spawn(args: list[str], result: Path, script: str = __file__, python: str = sys.executable) -> dict:
    """Run a worker of `script` in a fresh interpreter; return its result + wall time and peak RSS."""
    t0 = time.perf_counter()
    p = subprocess.Popen([python, str(Path(script).resolve()), *args, "--result", str(result)])
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed with exit code {p.returncode}")
    out = json.loads(result.read_text())
    out.update(wall_s=round(wall, 2), cpu_s=round(ru.ru_utime + ru.ru_stime, 2),
               peak_rss_mb=round(ru.ru_maxrss / 1024, 1))
    return out


def busy_processes() -> list[str]:
    """Other python/slmc processes (not ours) running while we measure."""
    r = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()
    me = {os.getpid(), os.getppid()}
    return [l.strip()[:120] for l in r[1:] if ("python" in l or "slmc" in l) and int(l.split()[0]) not in me
            and int(l.split()[1]) not in me and "ps -eo" not in l]


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    vers = {k: metadata.version(k) for k in ("torch", "executorch", "transformers")}
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return {"cores": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem, 1), "python": platform.python_version(),
            **vers, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def prompt_ids(model_dir: Path, vocab: int) -> list[int]:
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(PROMPT).ids[:16]
    return [(7 * i + 3) % vocab for i in range(16)]


def weight_count(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


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
        lines.append(f"| {name} | {x['wall_s']:.1f} | {x.get('cpu_s', float('nan')):.1f} | {x['peak_rss_mb']:.0f} | "
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


def phase_table(name: str, phases: list[dict]) -> list[str]:
    lines = [f"{name} phases (in-worker; peak RSS so far):", "", "| phase | s | peak RSS (MiB) |", "|---|---:|---:|"]
    return lines + [f"| {p['phase']} | {p['seconds']} | {p['peak_rss_mb_after']:.0f} |" for p in phases] + [""]


def others_seen(procs: list[str]) -> list[str]:
    if not procs:
        return []
    return ["Other python/slmc processes seen during the run (timings may overlap them):", ""] + \
        [f"- `{p}`" for p in procs] + [""]


def tiny_model(work: Path) -> str:
    """--quick: a tiny random Llama with a byte-level tokenizer, in `work`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_ascii_tokenizer, save_hf_model

    from slmc.compiler.families.llama import tiny_config

    model = work / "tiny"
    save_hf_model(tiny_config(), model)
    save_ascii_tokenizer(model)
    return str(model)


def bench_setup(a, prefix: str) -> tuple[Path, Path]:
    """A fresh work folder and the model folder (--quick: a tiny random Llama made in it)."""
    os.environ.setdefault("SLMC_CACHE", "/tmp/slmc-cache")
    sys.path.insert(0, str(ROOT))
    work = Path(tempfile.mkdtemp(prefix=prefix))
    from slmc.api import resolve_model_path

    return work, resolve_model_path(tiny_model(work) if a.quick else a.model)


def write_results(stem: str, r: dict, markdown) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(r))
    print(markdown(r))


def common_args(ap: argparse.ArgumentParser, steps: int, repeats: int) -> None:
    """The options every bench script takes (model, cache length, --quick, decode timing)."""
    ap.add_argument("--model", default="default", help="HF folder, or 'default' (SmolLM2-135M-Instruct)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default 512; 128 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, for a fast smoke test")
    ap.add_argument("--steps", type=int, default=steps, help="decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=repeats, help="timed repeats (after one warm-up)")


def main(a) -> None:
    work, model_dir = bench_setup(a, "slmc-bench-")
    cfg = json.loads((model_dir / "config.json").read_text())
    common = ["--model", str(model_dir), "--max-seq-len", str(a.max_seq_len)]
    others: set[str] = set(busy_processes())
    stem = "compile-quick" if a.quick else "compile"
    res: dict = {}
    if a.decode_only:  # re-time decode of the .pte files a previous full run left behind
        prev = json.loads((HERE / "results" / f"{stem}.json").read_text())
        res = {k: prev[k] for k in ("slmc", "reference")}
        others |= set(prev["other_processes"])
    for name in () if a.decode_only else ("slmc", "reference"):
        print(f"== compiling with {name} ...", flush=True)
        load = os.getloadavg()[0]
        res[name] = spawn(["--worker", "slmc" if name == "slmc" else "ref", *common,
                           "--out", str(work / name)], work / f"{name}.json")
        res[name].update(pte_bytes=Path(res[name]["pte"]).stat().st_size, loadavg_1m_before=load)
        others |= set(busy_processes())
        print(f"   {name}: {res[name]['wall_s']} s, peak RSS {res[name]['peak_rss_mb']} MiB", flush=True)
    ids = prompt_ids(model_dir, cfg["vocab_size"])
    print("== decode timing ...", flush=True)
    load = os.getloadavg()[0]
    dec = spawn(["--worker", "decode", "--ptes", json.dumps({k: res[k]["pte"] for k in ("slmc", "reference")}),
                 "--prompt-ids", json.dumps(ids), "--steps", str(a.steps), "--repeats", str(a.repeats)],
                work / "decode.json")
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
                   "slmc peak RSS / fp32 weight bytes": (s["peak_rss_mb"] * 2**20 / fp32, "≤ 1.5",
                                                        s["peak_rss_mb"] * 2**20 <= 1.5 * fp32),
                   "slmc decode tok/s / reference": (s["decode_tok_s"] / f["decode_tok_s"], "≥ 1.2",
                                                     s["decode_tok_s"] >= 1.2 * f["decode_tok_s"])},
         "info": {"slmc CPU s / reference CPU s (compile)": s["cpu_s"] / f["cpu_s"]} if "cpu_s" in s else {},
         "other_processes": sorted(others)}
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        r["greedy"]["slmc_text"] = Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(gs)
    write_results(stem, r, markdown)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, steps=64, repeats=5)
    ap.add_argument("--decode-only", action="store_true", help="re-time decode of the last run's .pte files")
    ap.add_argument("--worker", choices=("slmc", "ref", "decode"), help=argparse.SUPPRESS)
    [ap.add_argument(k, help=argparse.SUPPRESS) for k in ("--out", "--result", "--ptes", "--prompt-ids")]
    args = ap.parse_args()
    if args.max_seq_len is None:
        args.max_seq_len = 128 if args.quick else 512
    worker_main(args) if args.worker else main(args)
