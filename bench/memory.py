"""Compile memory benchmark: where the peak RSS of `slmc compile` comes from, per target.

    SLMC_CACHE=/tmp/slmc-cache flock /work/coord/heavy.lock nice -n 10 \\
        python bench/memory.py [--targets executorch tflite coreml onnx] [--recipe R] [--append] [--profile]
    python bench/memory.py --quick       # tiny random Llama, smoke test
    python bench/memory.py --model DIR --slmc-root /tmp/old-tree --commit OLD --append   # a before row
    flock /work/coord/heavy.lock nice -n 10 python bench/memory.py --cli --targets executorch --append

For each target, one fresh process runs `api.compile(model, target, recipe)` (fp32 without
--recipe: the `slmc compile default --target T` command) and reports:
- whole-process peak RSS and wall/CPU time from os.wait4 (the figures /usr/bin/time -v prints);
- per phase (slmc's progress steps): seconds, the highest RSS sampled during it (a thread reads
  VmRSS every 50 ms) and the RSS when it ends, so the step that sets the peak is named;
- the floor: the RSS of a process that only imports what that target's compile imports (torch,
  the converter) before touching a weight; with --warm-floor, also the RSS of that process after
  it has compiled a tiny random Llama for the same target and recipe: what the toolchain's first
  use costs whatever the model (lazily imported modules, op tables, caches, allocator arenas), so
  the peak splits into floor, first use and the model's own share;
- with --profile, cProfile's top entries by cumulative time (where the wall time goes).
With --cli, the command itself runs instead of a worker: `/usr/bin/time -v python -m slmc.cli -v
compile MODEL --target T` with the CLI's own defaults (max_seq_len included), the way the issue
measures it; the peak, wall and CPU are time's, each step's RSS high is sampled from the CLI
process (its -v log names the steps). Rows of several models sit in one file, one table each.
Goal (issue 17): peak RSS ≤ 1.5 × fp32 weight bytes (fp32 artifacts), ≤ 1.5 × (quantized weight
bytes + one layer's fp32) with a recipe. Rows are keyed by target, recipe and --commit, so a
run of an older tree (--slmc-root: the workers import slmc from there) sits beside the current
one in the same table. Writes bench/results/memory{,-quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import (RESULTS, Phases, bench_setup, peak_rss_mib, busy_processes, machine, others_seen, render, spawn, status_mib,
                     tiny_model, weight_count, write_results)

TARGETS = ("executorch", "tflite", "coreml", "onnx")  # each with its default backend, as the CLI
# what a compile for each target imports before it reads a weight (the floor), imported the way
# slmc imports it: "module" or "module:function", a function slmc's compile calls to import it;
# "a|b": b where a is missing (an older slmc tree, --slmc-root)
IMPORTS = {"executorch": ["executorch.exir", "executorch.backends.xnnpack.partition.xnnpack_partitioner"],
           "tflite": ["litert_torch", "ai_edge_litert.interpreter"],
           "coreml": ["slmc.targets.coreml_import:coremltools|coremltools"], "onnx": ["onnx", "onnxscript"]}


class Sampler:
    """VmRSS every 50 ms: the highest value seen in each phase (Phases names the phase)."""

    def __init__(self, ph: Phases):
        self.ph, self.high = ph, {}
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            name, rss = self.ph.name, status_mib("VmRSS")
            self.high[name] = max(self.high.get(name, 0.0), rss)
            time.sleep(0.05)


def worker_compile(a) -> dict:
    ph = Phases()
    sampler = Sampler(ph)
    if a.slmc_root:  # measure another tree's slmc (a before row)
        sys.path.insert(0, a.slmc_root)
    from slmc import api

    ph("compile setup")
    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    _, manifest = api.compile(api.CompileOptions(a.model, a.target, None, a.out, recipe=a.recipe,
                                                    max_seq_len=a.max_seq_len), progress=ph)
    ph("done")
    m = manifest["model"]
    out = {"artifact_bytes": sum(manifest["files"].values()), "params": m["params"],
           "weight_mib": round(m["weight_bytes"] / 2**20, 1), "slmc": api.__file__,
           "backend": manifest["backend"], "files": manifest["files"],
           "phases": [{**r, "rss_high_mib": round(sampler.high.get(r["phase"], 0.0), 1)} for r in ph.rows],
           # this process's own peak: spawn's os.wait4 figure counts the parent's RSS at the fork
           "own_peak_rss_mib": round(max([peak_rss_mib(), *sampler.high.values()]), 1)}
    if prof is not None:
        import io
        import pstats

        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
        out["profile_top"] = [ln.rstrip() for ln in s.getvalue().splitlines() if ln.strip()][:40]
    return out


def _import(entry: str) -> None:
    """Import one IMPORTS entry."""
    import importlib

    first, _, rest = entry.partition("|")
    module, _, fn = first.partition(":")
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError:
        if not rest:
            raise
        return _import(rest)
    if fn:
        getattr(imported, fn)()


def worker_floor(a) -> dict:
    import torch  # noqa: F401

    if a.slmc_root:
        sys.path.insert(0, a.slmc_root)
    from slmc import api

    for m in IMPORTS[a.target]:
        _import(m)
    out = {"floor_rss_mib": round(status_mib("VmRSS"), 1)}
    if a.tiny:
        # a model with next to no weights (made by the parent: transformers' import would count
        # here): what this process keeps after it is the toolchain's first-use cost, which a
        # compile of any model pays on top of the import floor
        ph = Phases()
        sampler = Sampler(ph)
        ph("tiny compile")
        api.compile(api.CompileOptions(a.tiny, a.target, None, a.out, recipe=a.recipe,
                                       max_seq_len=a.max_seq_len))
        ph("done")
        out |= {"warm_floor_rss_mib": round(status_mib("VmRSS"), 1),
                "warm_high_rss_mib": round(sampler.high.get("tiny compile", 0.0), 1)}
    return out


def main(a) -> None:
    work, model_dir = bench_setup(a, "slmc-mem-")
    stem = "memory-quick" if a.quick else "memory"
    prev = json.loads((RESULTS / f"{stem}.json").read_text()) if a.append and (RESULTS / f"{stem}.json").is_file() \
        else {}
    rows = {row_key(r, prev): r for r in prev.get("rows", [])}
    others = set(prev.get("other_processes", [])) | set(busy_processes())
    params = weight_count(model_dir)
    # positions up to the compile's cache length (the CLI's 2048 too)
    tiny = tiny_model(work, "warm-floor-tiny", max_position_embeddings=max(a.max_seq_len, 2048)) \
        if a.warm_floor else None
    layer_mib = round(layer_params(model_dir) * 4 / 2**20, 1)
    model = {"model": a.model if not a.quick else "tiny", "model_dir": str(model_dir), "params": params,
             "fp32_weight_mib": round(params * 4 / 2**20, 1)}
    for t in a.targets:
        print(f"== {t} ...", flush=True)
        common = ["--model", str(model_dir), "--target", t, "--max-seq-len", str(a.max_seq_len)] + \
            (["--recipe", a.recipe] if a.recipe else []) + (["--slmc-root", a.slmc_root] if a.slmc_root else [])
        floor = spawn(__file__, ["--worker", "floor", *common] +
                      (["--tiny", tiny, "--out", str(work / f"{t}-floor")] if tiny else []),
                      work / f"{t}-floor.json", errors="record")
        if "error" in floor:  # the compile's row stands; the floor's failure is its own column
            floor = {"floor_error": floor["error"]}
        if a.cli:
            r = cli_compile(a, "default" if a.model == "default" and not a.quick else model_dir, t, work / t)
        else:
            r = spawn(__file__, ["--worker", "compile", *common, "--out", str(work / t)] +
                      (["--profile"] if a.profile else []), work / f"{t}.json", errors="record")
        row = {"target": t, "recipe": a.recipe, "commit": a.commit, "layer_fp32_mib": layer_mib, **model,
               "max_seq_len": "CLI default" if a.cli else a.max_seq_len, **floor, **r}
        rows[row_key(row, prev)] = row
        others |= set(busy_processes())
        print(f"   {r['error']}" if "error" in r else f"   {r['wall_s']} s, peak RSS {r['peak_rss_mib']} MiB", flush=True)
    first = {k: prev[k] for k in ("model_dir", "params", "fp32_weight_mib", "max_seq_len") if k in prev} or \
        {**{k: model[k] for k in ("model_dir", "params", "fp32_weight_mib")}, "max_seq_len": a.max_seq_len}
    write_results(stem, {**first, "machine": machine(), "rows": list(rows.values()),
                         "before": prev.get("before", a.before), "other_processes": sorted(others)}, echo=False)


def cli_compile(a, model, target: str, out: Path) -> dict:
    """`slmc -v compile MODEL --target T [--recipe R]` under /usr/bin/time -v: its peak RSS,
    wall and CPU as time reports them, and per step (the CLI's -v log lines) the highest VmRSS
    of the CLI process, sampled every 50 ms."""
    model = model if str(model) == "default" else Path(model).resolve()  # it runs in root (below)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "slmc.cli", "-v", "compile", str(model), "--target", target,
           "--out", str(out)] + (["--recipe", a.recipe] if a.recipe else [])
    root = a.slmc_root or str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "COLUMNS": "240"}
    # cwd=root: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH, so
    # run from another checkout it imported that checkout's slmc, not --slmc-root's
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    phase, rows, high, t0, lines = ["startup+imports"], [], {}, [time.perf_counter()], []
    file_at_high = {}  # RssFile (mapped files: the checkpoint, libraries) when the phase's high was sampled

    def sample():
        child = None
        while p.poll() is None:
            try:
                if child is None:
                    kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
                    child = kids[0] if kids else None
                if child is not None:
                    st = {ln.split(":")[0]: int(ln.split()[1]) / 1024 for ln in
                          Path(f"/proc/{child}/status").read_text().splitlines() if ln.startswith(("VmRSS", "RssFile"))}
                    if st["VmRSS"] > high.get(phase[0], 0.0):
                        high[phase[0]], file_at_high[phase[0]] = st["VmRSS"], st.get("RssFile", 0.0)
            except (OSError, KeyError, ValueError, IndexError):
                pass
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    step = re.compile(r"^\[[0-9:]+\]\s+(.*?)\s+cli\.py:\d+\s*$")
    for ln in p.stderr:
        lines.append(ln.rstrip())
        m = step.match(ln.strip())
        if m:
            now = time.perf_counter()
            rows.append({"phase": phase[0], "seconds": round(now - t0[0], 2)})
            phase[0], t0[0] = m.group(1), now
    code = p.wait()
    rows.append({"phase": phase[0], "seconds": round(time.perf_counter() - t0[0], 2)})
    rep = {k.strip(): v.strip() for k, _, v in (ln.partition(": ") for ln in lines if ": " in ln)}
    if code != 0 or "Maximum resident set size (kbytes)" not in rep:
        return {"error": next((ln for ln in reversed(lines) if ln.strip() and "Command exited" not in ln
                               and not ln.startswith("\t")), f"exit {code}")[:300]}
    h, m_, s_ = ([0, 0] + rep["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":"))[-3:]
    manifest = json.loads((out / "manifest.json").read_text())
    return {"how": "/usr/bin/time -v slmc -v compile", "command": " ".join(cmd[2:]),
            "peak_rss_mib": round(int(rep["Maximum resident set size (kbytes)"]) / 1024, 1),
            "wall_s": round(int(h) * 3600 + int(m_) * 60 + float(s_), 2),
            "cpu_s": round(float(rep["User time (seconds)"]) + float(rep["System time (seconds)"]), 2),
            "artifact_bytes": sum(manifest["files"].values()), "backend": manifest["backend"],
            "files": manifest["files"], "weight_mib": round(manifest["model"]["weight_bytes"] / 2**20, 1),
            "max_seq_len": manifest["kv_cache_spec"]["max_len"],
            "phases": [{**r, "rss_high_mib": round(high.get(r["phase"], 0.0), 1),
                        "rss_file_at_high_mib": round(file_at_high.get(r["phase"], 0.0), 1)} for r in rows]}


def layer_params(model_dir: Path) -> int:
    """Parameters of decoder layer 0 in the checkpoint (`...layers.0.` tensors): one layer's fp32
    is what the quantized goal allows beside the quantized weights."""
    import math

    from safetensors import safe_open

    n = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys() if ".layers.0." in k)
    return n


def row_key(r: dict, top: dict | None = None) -> str:
    """model (the file's first model for rows without one), target, recipe, commit, how measured."""
    model = r.get("model_dir") or (top or {}).get("model_dir", "")
    return f"{model}|{r['target']}|{r.get('recipe') or ''}|{r.get('commit', '')}|{r.get('how', '')}"


def goal_mib(x: dict, fp32_mib: float) -> tuple[float, str]:
    """The issue's bound for this row and how it is made."""
    if not x.get("recipe"):
        return 1.5 * fp32_mib, "1.5 × fp32"
    return 1.5 * (x["weight_mib"] + x["layer_fp32_mib"]), "1.5 × (quantized + 1 layer fp32)"


def judged_peak(x: dict) -> float:
    """The higher of the kernel's figure (/usr/bin/time, os.wait4) and the highest VmRSS sampled:
    the kernel's high-water mark can miss a peak (default-model ONNX row 4741931: 657 MiB from
    /usr/bin/time, 726 sampled), so a goal is judged on the higher one."""
    return max([x["peak_rss_mib"]] + [p.get("rss_high_mib", 0.0) for p in x.get("phases", [])])


def markdown(r: dict) -> str:
    """One table (and its phase tables) per model measured; rows without a model of their
    own are the file's first model's."""
    m = r["machine"]
    lines = ["# Compile memory: peak RSS of `slmc compile MODEL --target T [--recipe R]`", "",
             f"{m['date']} · {m['cpu']} · {m['cores']} cores · {m['mem_gib']} GiB · torch {m['torch']} · "
             f"executorch {m['executorch']} · peak RSS of a worker running api.compile (its own VmHWM; rows "
             "measured before 2026-12-04T21 took os.wait4's, which also counts this script's RSS at the fork) or, how = cli, from /usr/bin/time -v around the CLI itself; "
             "* where the highest VmRSS sampled every 50 ms was higher by 1 MiB or more (the kernel's high-water mark "
             "missed it), the sampled figure, on which the goal is then judged", ""]
    groups: dict[str, list] = {}
    for x in r["rows"]:
        groups.setdefault(x.get("model_dir", r["model_dir"]), []).append(x)
    for model_dir, rows in groups.items():
        lines += model_section(r, model_dir, rows)
    lines.append("")
    return "\n".join(lines + others_seen(r["other_processes"]))


def model_section(r: dict, model_dir: str, rows: list) -> list[str]:
    x0 = rows[0]
    w, params = x0.get("fp32_weight_mib", r["fp32_weight_mib"]), x0.get("params", r["params"])
    name = x0.get("model", model_dir)
    lines = [f"## {name} ({params:,} params, fp32 weights {w:.0f} MiB = {w * 2**20 / 1e6:.0f} MB)", "",
             "| target | recipe | commit | how | max_seq_len | wall (s) | CPU (s) | peak RSS (MiB) | peak / fp32 weights "
             "| import floor (MiB) | floor after a tiny compile (MiB) | (peak − floor) / fp32 | artifact (MiB) "
             "| goal (MiB) | peak ≤ goal | peak − floor ≤ goal |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    order = sorted(rows, key=lambda x: (x["target"], x.get("recipe") or "", x.get("commit", ""), x.get("how", "")))
    for x in order:
        rec, how_measured = x.get("recipe") or "fp32", "cli" if x.get("how") else "worker"
        msl = x.get("max_seq_len", r["max_seq_len"])
        if "error" in x:
            lines.append(f"| {x['target']} | {rec} | {x.get('commit', '')} | {how_measured} | {msl} | "
                         f"failed: {x['error']} | | | | | | | | | | |")
            continue
        # a floor that failed (floor_error) leaves its columns empty, not a floor of 0
        p, f = judged_peak(x), x.get("floor_rss_mib")
        g, how = goal_mib(x, w) if x.get("recipe") is None or "weight_mib" in x else (None, "")
        verdict = (lambda v: "PASS" if v <= g else "FAIL") if g else (lambda v: "")
        warm = f"{x['warm_floor_rss_mib']:.0f}" if "warm_floor_rss_mib" in x else ""
        lines.append(f"| {x['target']} | {rec} | {x.get('commit', '')} | {how_measured} | {msl} | {x['wall_s']:.0f} | "
                     f"{x['cpu_s']:.0f} | {p:.0f}{'*' if p - x['peak_rss_mib'] >= 1 else ''} | {p / w:.2f} | "
                     f"{'' if f is None else f'{f:.0f}'} | {warm} | {'' if f is None else f'{(p - f) / w:.2f}'} | "
                     f"{x['artifact_bytes'] / 2**20:.1f} | {f'{g:.0f} ({how})' if g else ''} | {verdict(p)} | "
                     f"{'' if f is None else verdict(p - f)} |")
    if r.get("before") and model_dir == r["model_dir"]:
        lines += ["", "Earlier (measured with /usr/bin/time -v around the CLI, same model):", "",
                  "| target | commit | wall (s) | CPU (s) | peak RSS (MiB) | peak / fp32 | artifact (MiB) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for b in r["before"]:
            lines.append(f"| {b['target']} | {b['commit']} | {b['wall_s']:.0f} | {b['cpu_s']:.0f} | "
                         f"{b['peak_rss_mib']:.0f} | {b['peak_rss_mib'] / w:.2f} | {b['artifact_mib']:.1f} |")
    for x in order:
        if "phases" not in x:
            continue
        lines += ["", f"{x['target']}, {x.get('recipe') or 'fp32'}, {x.get('commit', '')}"
                  f"{', ' + x['how'] if x.get('how') else ''} phases (highest sampled RSS in the phase"
                  f"{'' if x.get('how') else '; RSS peak so far at its end'}):", "",
                  "| phase | s | RSS high in phase (MiB) | peak so far (MiB) | of the high: mapped files (MiB) |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {p['phase']} | {p['seconds']} | {p.get('rss_high_mib', 0):.0f} | "
                  f"{p['peak_rss_mib_after']:.0f} | |" if "peak_rss_mib_after" in p else
                  f"| {p['phase']} | {p['seconds']} | {p.get('rss_high_mib', 0):.0f} | | "
                  f"{p.get('rss_file_at_high_mib', 0):.0f} |" for p in x["phases"]]
        if x.get("profile_top"):
            lines += ["", f"{x['target']}: cProfile, top entries by cumulative time:", "", "```"] + \
                x["profile_top"] + ["```"]
    return lines + [""]


def notes(r: dict) -> str | None:
    """bench/README.md's paragraph: the findings written into the results file's notes."""
    return (r.get("notes") or {}).get("text")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    ap.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default 512; 128 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--recipe", default=None, help="a quantization recipe (e.g. int8da-int4w-g32); default fp32")
    ap.add_argument("--slmc-root", default=None, help="import slmc from this tree (to measure an older commit)")
    ap.add_argument("--profile", action="store_true", help="cProfile the compile (slower)")
    ap.add_argument("--append", action="store_true", help="keep the rows of targets not run now")
    ap.add_argument("--commit", default="", help="the slmc commit measured (for the table)")
    ap.add_argument("--before", type=json.loads, default=None,
                    help="JSON list of earlier /usr/bin/time -v measurements: target, commit, wall_s, cpu_s, "
                         "peak_rss_mib, artifact_mib")
    ap.add_argument("--cli", action="store_true",
                    help="measure the CLI command under /usr/bin/time -v (its own defaults) instead of a worker")
    ap.add_argument("--warm-floor", action="store_true",
                    help="also measure the floor after a tiny model's compile in the floor's process (first-use cost)")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--worker", choices=("compile", "floor"), help=argparse.SUPPRESS)
    for k in ("--target", "--out", "--result", "--tiny"):
        ap.add_argument(k, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.max_seq_len is None:
        a.max_seq_len = 128 if a.quick else 512
    if a.render:
        render("memory")
    elif a.worker:
        fn = worker_compile if a.worker == "compile" else worker_floor
        Path(a.result).write_text(json.dumps(fn(a)))
    else:
        main(a)
