"""Where the calibrated recipe's compile time goes as models widen (issue 17's superlinear growth).

    SLMC_CACHE=/tmp/slmc-cache flock /work/coord/heavy.lock nice -n 10 \\
        python bench/scale_calib.py [--models llama-3.2-1b qwen2.5-3b] [--append]
    python bench/scale_calib.py --quick     # the tiny random Llama, 1 and 2 layers
    python bench/scale_calib.py --render    # results/scale_calib.md again from the .json

bench/results/scale.md times the whole calibrated recipe (int8da-int4w-g32: quant.awq's scales
folded, then quant.gptq, data-free) at 1B, 1.5B and 3B, and its time grows faster than the
parameter count. This benchmark says where. Each scale model's public config is cut to 1 and to
2 decoder layers (every width and the vocabulary as published) and given random weights
(bench/scale.py's writer); a fresh process per cut loads it and runs the recipe's quant passes
under a call-path profiler (sys.setprofile; it times every call path through the slmc functions
in FOLLOWED, and torch's kernels run unhooked). A component is the own time (less the followed
calls inside) of those functions, by what they are (OWN) and where they were called. What runs
under a decoder layer's block (PER_LAYER, and the sampling's LBlock calls) is per layer: the
2-layer run's seconds over 2, read in one run, not as a difference of two runs (the host's speed
drifts by several per cent between runs, which a difference of two 150 s runs turns into 10 s
"per layer"). The rest runs once per model: the head's GPTQ ("quant.gptq, head: ..."), the
embedding, the sampling's head, steps and weight fingerprint, the passes' own code. A pass at n
layers is predicted as once + n x per layer; the 1-layer run (and any other --layers cut) checks
that prediction, and at the published depth it is set beside scale.json's measured pass phases.
The host's fp32 GEMM rate is measured before each run: scale.json's rows ran on other days, and
this host's arithmetic speed has varied up to 3x between days.

The work model, fixed before any run: per decoder layer, from the config, with T calibration
tokens (n_seqs x seq_len) and the layer's four sites (rows, cols): q/k/v (n_heads + 2 n_kv) x
head_dim by hidden, o hidden by n_heads x head_dim, gate/up 2 x intermediate by hidden, down
hidden by intermediate:
  block forward   2 T (layer parameters) + 4 n_seqs seq_len^2 n_heads head_dim (attention);
                  drawing the data-free samples runs the same tokens through the layer
  AWQ search      n_grid x 2 x 1024 tokens x cols x min(rows, 512), summed over searched sites
  GPTQ Hessian    T cols^2 per site (X^T X)
  GPTQ factor     cols^3 per site (two Cholesky factorizations and an inverse)
  GPTQ loop       rows cols (block + cols) / 2 per site (error feedback inside and after each block)
A component whose seconds per unit of work stay the same from the narrowest model to the
widest grows as its work does; the work model then names the cause.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from _common import RESULTS, busy_processes, head_commit, machine, others_seen, render, spawn, write_results
from scale import MODELS, model_folder, published_config

RECIPE = "int8da-int4w-g32"
N_GRID, SKETCH_TOKENS, SEARCH_ROWS, GPTQ_BLOCK = 20, 1024, 512, 128  # quant.awq's and quant.gptq's defaults

PASSES = ("quant.awq", "quant.gptq")
# slmc's functions the profiler follows ("file under slmc/:name"); every call path through them is timed
FOLLOWED = {
    "compiler/calib.py:sample_ids", "compiler/calib.py:fingerprint", "compiler/calib.py:forward",
    "compiler/lowering/module.py:forward", "compiler/calib.py:run_block", "compiler/calib.py:gram",
    "compiler/spill.py:spill_codes", "compiler/spill.py:spill_tree", "passes/_quant.py:quantize_ends",
    "passes/quant_awq.py:apply", "passes/quant_awq.py:_block", "passes/quant_awq.py:search_scale",
    "passes/quant_awq.py:_fold", "passes/quant_gptq.py:run", "passes/quant_gptq.py:_site",
    "passes/quant_gptq.py:_head", "passes/quant_gptq.py:gptq", "passes/quant_gptq.py:_hinv_upper",
    "passes/quant_gptq.py:_column_major_", "passes/quant_gptq.py:clipped_params",
}
# a followed function's own time (less the followed calls inside it) goes to this component
OWN = {
    "compiler/calib.py:run_block": "block forward", "compiler/calib.py:gram": "Hessian (X^T X)",
    "compiler/spill.py:spill_codes": "spill to scratch", "compiler/spill.py:spill_tree": "spill to scratch",
    "passes/_quant.py:quantize_ends": "embedding", "passes/quant_awq.py:_block": "block rest",
    "passes/quant_awq.py:search_scale": "scale search", "passes/quant_awq.py:_fold": "fold",
    "passes/quant_gptq.py:_site": "site rest", "passes/quant_gptq.py:gptq": "column loop",
    "passes/quant_gptq.py:_hinv_upper": "factor", "passes/quant_gptq.py:_column_major_": "permute",
    "passes/quant_gptq.py:clipped_params": "clip search",
}
# what runs once per decoder layer (the rest runs once per model: embedding, head, the passes' own code)
PER_LAYER = {"compiler/calib.py:run_block", "passes/quant_awq.py:_block", "passes/quant_gptq.py:_site",
             "compiler/spill.py:spill_codes", "compiler/spill.py:spill_tree"}
BLOCK = "compiler/lowering/module.py:forward"  # LoweredLM's and, inside it, each LBlock's


def label(pass_name: str, path: tuple[str, ...]) -> tuple[str, bool]:
    """The component a call path's own time belongs to, and whether it is per decoder layer.
    The head's GPTQ is kept apart from the layers' ('quant.gptq, head: ...'); the data-free
    sampling is split into its decoder layers, its head, the weights' fingerprint and the rest."""
    if "compiler/calib.py:sample_ids" in path:  # drawn by AWQ; GPTQ finds them by the weights' fingerprint
        if "compiler/calib.py:fingerprint" in path:
            return f"{pass_name}, samples: weight fingerprint", False
        if path[-1] == "compiler/calib.py:forward":
            return f"{pass_name}, samples: head", False
        if path.count(BLOCK) >= 2:
            return f"{pass_name}, samples: decoder layers", True
        return f"{pass_name}, samples: rest (steps, embedding, model copy)", False
    if "passes/quant_gptq.py:_head" in path:
        return f"{pass_name}, head: {OWN.get(path[-1], 'rest')}", False
    return f"{pass_name}: {OWN.get(path[-1], 'rest')}", any(f in PER_LAYER for f in path)


class PathProfiler:
    """Inclusive seconds and calls per call path of FOLLOWED functions (sys.setprofile: every
    other call costs the callback one dict lookup; torch's kernels run unhooked)."""

    def __init__(self):
        self.keys: dict = {}
        self.stack: list = []
        self.paths: dict[tuple, list] = {}

    def _key(self, code) -> str:
        k = self.keys.get(code)
        if k is None:
            name = _slmc_name(code.co_filename, code.co_name)
            k = self.keys[code] = name if name in FOLLOWED else ""
        return k

    def __call__(self, frame, event, arg):
        if event == "call":
            k = self._key(frame.f_code)
            if k:
                self.stack.append((frame, k, time.perf_counter()))
        elif event == "return" and self.stack and self.stack[-1][0] is frame:
            _, k, t0 = self.stack.pop()
            acc = self.paths.setdefault(tuple(x[1] for x in self.stack) + (k,), [0, 0.0])
            acc[0] += 1
            acc[1] += time.perf_counter() - t0

    def own_seconds(self) -> list[dict]:
        """Per path: calls, inclusive seconds, and own seconds (less the followed calls inside)."""
        inner: dict[tuple, float] = {}
        for path, (_, t) in self.paths.items():
            if len(path) > 1:
                inner[path[:-1]] = inner.get(path[:-1], 0.0) + t
        return [{"path": list(p), "calls": n, "seconds": round(t, 4), "own_seconds": round(t - inner.get(p, 0.0), 4)}
                for p, (n, t) in sorted(self.paths.items())]


# ------------------------------------------------------------------ work model


def sites(c: dict) -> list[tuple[str, int, int]]:
    h, inter, nh, nkv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // nh
    return [("q/k/v", (nh + 2 * nkv) * hd, h), ("o", h, nh * hd), ("gate/up", 2 * inter, h), ("down", h, inter)]


def work(c: dict, n_seqs: int, seq_len: int) -> dict[str, float]:
    """Units of work per decoder layer for each modelled component (see the module docstring)."""
    t, ss = n_seqs * seq_len, sites(c)
    nh = c["num_attention_heads"]
    hd = c.get("head_dim") or c["hidden_size"] // nh
    params = sum(r * k for _, r, k in ss)
    fwd = 2 * t * params + 4 * n_seqs * seq_len ** 2 * nh * hd
    # o is searched only where n_heads == n_kv_heads (v's rows carry o's inputs otherwise not)
    searched = [s for s in ss if s[0] != "o" or nh == c["num_key_value_heads"]]
    return {"quant.awq, samples: decoder layers": fwd, "quant.awq: block forward": fwd, "quant.gptq: block forward": fwd,
            "quant.awq: scale search": sum(N_GRID * 2 * SKETCH_TOKENS * k * min(r, SEARCH_ROWS) for _, r, k in searched),
            "quant.gptq: Hessian (X^T X)": sum(t * k * k for _, _, k in ss),
            "quant.gptq: factor": sum(k ** 3 for _, _, k in ss),
            "quant.gptq: column loop": sum(r * k * (GPTQ_BLOCK + k) / 2 for _, r, k in ss)}


# ------------------------------------------------------------------ worker


def worker(a) -> dict:
    """Load the cut model and run the recipe's quant passes, each under its own PathProfiler."""
    import sys

    from slmc import api

    ir = api.load(a.model, max_seq_len=a.max_seq_len)
    passes = [p for p in api.compile_passes(RECIPE, "executorch") if p.split(":")[0] in PASSES]
    out = {"passes": passes, "pass_seconds": {}, "calibration": [], "paths": {}}
    for spec in passes:  # one pipeline each: the samples AWQ draws are carried on the IR to GPTQ
        prof = PathProfiler()
        sys.setprofile(prof)
        try:
            ir, logs = api.run_passes(ir, [spec])
        finally:
            sys.setprofile(None)
        out["pass_seconds"][logs[0].name] = logs[0].seconds
        out["calibration"].append(logs[0].info.get("calibration"))
        out["paths"][logs[0].name] = prof.own_seconds()
    return out


def _slmc_name(file: str, fn: str) -> str | None:
    i = file.rfind("/slmc/")
    return None if i < 0 else f"{file[i + 6:]}:{fn}"


def components(run: dict) -> dict[str, tuple[float, bool]]:
    """Seconds per component in one profiled run, and whether it is per decoder layer; each
    pass's time outside every followed function is its '<pass>: outside' (once per model)."""
    out: dict[str, list] = {}
    for p in PASSES:
        inside = 0.0
        for x in run["paths"][p]:
            k, per_layer = label(p, tuple(x["path"]))
            out.setdefault(k, [0.0, per_layer])[0] += x["own_seconds"]
            inside += x["own_seconds"]
        out[f"{p}: outside"] = [run["pass_seconds"][p] - inside, False]
    return {k: (v[0], v[1]) for k, v in sorted(out.items(), key=lambda kv: _rank(kv[0]))}


def _pass(k: str) -> str:
    """The pass a component label belongs to ('quant.gptq, head: factor' -> 'quant.gptq')."""
    return k.split(",")[0].split(":")[0]


def _rank(k: str) -> tuple:
    return (PASSES.index(_pass(k)), "samples" not in k, "head" in k, k)


# ------------------------------------------------------------------ driver


SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "vocab_size")


def scale_measured(name: str) -> list[dict]:
    """scale.json's measured pass times for this model and recipe (one entry per target row)."""
    f = RESULTS / "scale.json"
    if not f.is_file():
        return []
    out = []
    for r in json.loads(f.read_text())["rows"]:
        if r["model"] == name and r.get("recipe") == RECIPE and "phases" in r:
            ph = {p["phase"].removeprefix("pass "): p["seconds"] for p in r["phases"]}
            out.append({"target": r["target"], "commit": r.get("commit"), **{p: ph.get(p) for p in PASSES}})
    return out


def measure(name: str, work_dir: Path, a) -> dict:
    """Profiled runs of `name` cut to each of a.layers (1 and 2 give the per-layer and once
    costs; a deeper cut checks the prediction they make for it)."""
    from estimate import host_gemm

    runs = {}
    for n in a.layers:
        d = model_folder(name, work_dir, a.quick, layers=n)
        gemm = host_gemm()["fp32_gflops"]
        print(f"== {name}, {n} layer(s): {RECIPE}'s quant passes, profiled (host GEMM {gemm} GFLOP/s) ...", flush=True)
        r = spawn(__file__, ["--worker", "--model", str(d), "--max-seq-len", str(a.max_seq_len)],
                  work_dir / f"{name}-L{n}.json")
        print(f"   {r['wall_s']} s wall, passes {r['pass_seconds']}", flush=True)
        runs[str(n)] = {**r, "commit": head_commit(), "host_gemm_fp32_gflops": gemm}
    full = published_config(name, a.quick)
    return {"model": name, "commit": head_commit(), "config": {k: full[k] for k in SHAPE_KEYS if full.get(k)},
            "runs": runs, "scale_measured": [] if a.quick else scale_measured(name)}


def calib_shape(row: dict) -> tuple[int, int]:
    """n_seqs, seq_len from the passes' calibration description ('..., 16x256 tokens, ...')."""
    desc = next(c for run in row["runs"].values() for c in run["calibration"] if c)
    n, s = re.search(r"(\d+)x(\d+) tokens", desc).groups()
    return int(n), int(s)


def derived(row: dict) -> dict:
    """From the 2-layer run: per component its seconds per decoder layer (what runs per layer,
    over 2) or once per model; per pass the same split. A pass at n layers is predicted as
    once + n x per layer; every other cut's run checks that prediction."""
    base = row["runs"]["2"]
    w = work(row["config"], *calib_shape(row))
    comp, passes = {}, {p: {"once_s": 0.0, "per_layer_s": 0.0} for p in PASSES}
    for k, (sec, per_layer) in components(base).items():
        comp[k] = {"per_layer": per_layer, "seconds": sec / 2 if per_layer else sec, "work_per_layer": w.get(k)}
        passes[_pass(k)]["per_layer_s" if per_layer else "once_s"] += comp[k]["seconds"]
    for p in PASSES:
        passes[p]["full_s"] = passes[p]["once_s"] + row["config"]["num_hidden_layers"] * passes[p]["per_layer_s"]
    return {"components": comp, "passes": passes}


def main(a) -> None:
    stem = "scale_calib-quick" if a.quick else "scale_calib"
    work_dir = Path(a.work)
    work_dir.mkdir(parents=True, exist_ok=True)
    prev = json.loads((RESULTS / f"{stem}.json").read_text()) if a.append and (RESULTS / f"{stem}.json").is_file() \
        else {}
    rows = {r["model"]: r for r in prev.get("rows", [])}
    others = set(prev.get("other_processes", [])) | set(busy_processes())
    for name in (["tiny"] if a.quick else a.models):
        r = measure(name, work_dir, a)
        if name in rows:  # --append: these cuts replace the row's same cuts, its others are kept
            r["runs"] = {**rows[name]["runs"], **r["runs"]}
        rows[name] = r
        others |= set(busy_processes())
        write_results(stem, {"machine": machine(), "recipe": RECIPE, "max_seq_len": a.max_seq_len,
                             "rows": sorted(rows.values(), key=lambda r: _order(r["model"])),
                             "other_processes": sorted(others)}, echo=False)
    print((RESULTS / f"{stem}.md").read_text())


def _order(m: str) -> int:
    return MODELS.index(m) if m in MODELS else -1


# ------------------------------------------------------------------ rendering


def notes(r: dict) -> str | None:
    """bench/README.md's paragraph: the findings written into the results file's notes."""
    return (r.get("notes") or {}).get("text")


def _ratio(xs: list) -> str:
    return f"{xs[-1] / xs[0]:.2f}" if len(xs) > 1 and xs[0] and xs[0] > 0.05 else "—"


def markdown(r: dict) -> str:
    m, rows = r["machine"], r["rows"]
    ds = [derived(x) for x in rows]
    names = [x["model"] for x in rows]
    labels = sorted({k for d in ds for k in d["components"]}, key=_rank)
    per_layer = {k: any(d["components"].get(k, {}).get("per_layer") for d in ds) for k in labels}
    zero = {"per_layer": False, "seconds": 0.0, "work_per_layer": None}
    cell = lambda d, k: d["components"].get(k, zero)  # noqa: E731  (AWQ's exact Gram only below 1024 wide)
    lines = ["# Calibrated compile time by component, 1B-3B widths (cut to 1 and 2 layers, call paths profiled)", "",
             f"{m['date']} · {m['cpu']} · {m['cores']} cores · {m['mem_gib']} GiB · torch {m['torch']} · "
             f"recipe {r['recipe']}'s quant passes: " + " ".join(f"`{p}`" for p in rows[0]["runs"]["2"]["passes"]),
             "", f"Calibration: {next(c for c in rows[0]['runs']['2']['calibration'] if c)}.", "",
             "Seconds per decoder layer (the 2-layer run's, over 2), and their growth from the first model to the "
             "last beside the work model's (module docstring):", "",
             "| component | " + " | ".join(names) + " | seconds, last / first | work, last / first |",
             "|---|" + "---:|" * (len(names) + 2)]
    for k in (k for k in labels if per_layer[k]):
        sec = [cell(d, k)["seconds"] for d in ds]
        lines.append(f"| {k} | " + " | ".join(f"{x:.2f}" for x in sec) +
                     f" | {_ratio(sec)} | {_ratio([cell(d, k)['work_per_layer'] for d in ds])} |")
    for p in PASSES:
        sec = [d["passes"][p]["per_layer_s"] for d in ds]
        lines.append(f"| **{p}, per layer** | " + " | ".join(f"{x:.2f}" for x in sec) + f" | {_ratio(sec)} | |")
    lines += ["", "Seconds per unit of work (ns), per layer: the same rate at every width means the work model "
              "accounts for the growth:", "", "| component | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in labels:
        if all(cell(d, k)["work_per_layer"] for d in ds):
            lines.append(f"| {k} | " + " | ".join(
                f"{cell(d, k)['seconds'] / cell(d, k)['work_per_layer'] * 1e9:.3g}" for d in ds) + " |")
    lines += ["", "Once per model (seconds, the 2-layer run's): the vocabulary's head and embedding, the samples' "
              "steps and head, the passes' own code:", "", "| component | " + " | ".join(names) + " | seconds, last / first |",
              "|---|" + "---:|" * (len(names) + 1)]
    for k in (k for k in labels if not per_layer[k]):
        sec = [cell(d, k)["seconds"] for d in ds]
        lines.append(f"| {k} | " + " | ".join(f"{x:.2f}" for x in sec) + f" | {_ratio(sec)} |")
    for p in PASSES:
        sec = [d["passes"][p]["once_s"] for d in ds]
        lines.append(f"| **{p}, once** | " + " | ".join(f"{x:.2f}" for x in sec) + f" | {_ratio(sec)} |")
    lines += ["", "The prediction (once + layers x per layer, from the 2-layer run) against the other cuts' own runs, "
              "and at the published depth against bench/results/scale.json's whole compiles (other days, other "
              "commits; its notes say which shared the host):", "",
              "| model | layers | pass | predicted (s) | measured (s) | measured / predicted |", "|---|---:|---|---:|---|---:|"]
    for x, d in zip(rows, ds):
        for n in sorted((n for n in x["runs"] if n != "2"), key=int):
            for p in PASSES:
                pred = d["passes"][p]["once_s"] + int(n) * d["passes"][p]["per_layer_s"]
                got = x["runs"][n]["pass_seconds"][p]
                lines.append(f"| {x['model']} | {n} | {p} | {pred:.0f} | {got:.0f} (this run) | {got / pred:.2f} |")
        for p in PASSES:
            full = d["passes"][p]["full_s"]
            for sm in x.get("scale_measured", []):
                if sm.get(p) is not None:
                    lines.append(f"| {x['model']} | {x['config']['num_hidden_layers']} | {p} | {full:.0f} | "
                                 f"{sm[p]:.0f} ({sm['target']} @ {sm['commit']}) | {sm[p] / full:.2f} |")
    lines += ["", "Profiled runs (fresh process each; wall includes loading the cut model):", "",
              "| model | commit | layers | wall (s) | quant.awq (s) | quant.gptq (s) | host fp32 GEMM before it (GFLOP/s) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for x in rows:
        for n, run in sorted(x["runs"].items(), key=lambda kv: int(kv[0])):
            ps = run["pass_seconds"]
            lines.append(f"| {x['model']} | {run['commit']} | {n} | {run['wall_s']:.0f} | {ps['quant.awq']:.1f} | "
                         f"{ps['quant.gptq']:.1f} | {run['host_gemm_fp32_gflops']} |")
    lines.append("")
    return "\n".join(lines + others_seen(r["other_processes"]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--max-seq-len", type=int, default=None, help="KV cache length of the loaded model (512; 256 --quick)")
    ap.add_argument("--work", default="/tmp/slmc-scale-calib", help="the cut random checkpoints (kept between runs)")
    ap.add_argument("--append", action="store_true", help="keep the models and cuts measured in the last results file")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2],
                    help="the cuts to run (1 and 2 make the prediction; a deeper one checks it)")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, smoke test")
    ap.add_argument("--render", action="store_true", help="only re-render results/scale_calib*.md from the .json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for k in ("--model", "--result"):
        ap.add_argument(k, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.max_seq_len is None:
        a.max_seq_len = 256 if a.quick else 512
    if a.render:
        render("scale_calib")
    elif a.worker:
        Path(a.result).write_text(json.dumps(worker(a)))
    else:
        main(a)
