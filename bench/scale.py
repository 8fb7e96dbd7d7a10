"""Scale benchmark: phone-size models (1B-3B) compiled to ExecuTorch and LiteRT 8da4w.

    SLMC_CACHE=/tmp/slmc-cache flock /work/coord/heavy.lock nice -n 10 \\
        python bench/scale.py --models llama-3.2-1b --targets executorch [--append]
    python bench/scale.py --quick        # a tiny random Llama through the same steps
    python bench/scale.py --render       # results/scale.md again from the .json

Models: the public config.json of each (bench/configs/<name>/config.json, values as published
on the Hugging Face Hub), instantiated with random weights (nothing is downloaded): the tensor
names and shapes come from transformers' model built on the meta device, and the bf16
safetensors file is written one tensor at a time, so making a 3B model never holds it in RAM.
Each (model, target, recipe) compile runs in its own fresh process (--recipe, default
int8da-int4w-g32, the 8-bit-dynamic-activation / 4-bit-weight flow both targets run;
int8da-int4w-g32-rtn is the same layout without calibration, so its rows measure the lowering's
scale apart from the quantizer's): wall, CPU and the worker's own peak RSS (its VmHWM, or the
highest VmRSS its watchdog sampled if higher; not os.wait4's, which counts this parent's RSS at the
fork), per-phase time and peak RSS, artifact size.
A watchdog in the worker ends a compile whose RSS passes --rss-limit-gib (the machine is shared;
an out-of-memory kill would hit other processes), recording the phase it was in.
Then one process per artifact times greedy decode (median of repeats after a warm-up).
Growth: each figure against parameter count, as a log-log slope between the smallest and the
largest model measured (1.0 = linear). Rows not run are listed with the reason.
Writes bench/results/scale{,-quick}.{json,md}; --append keeps the rows already measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import threading
import time
from pathlib import Path

from _common import (HERE, RESULTS, Phases, peak_rss_mib, busy_processes, dir_bytes, head_commit, machine, others_seen, phase_table,
                     render, spawn, status_mib, weight_count, write_results)

MODELS = ("llama-3.2-1b", "qwen2.5-1.5b", "qwen2.5-3b")
TARGETS = {"executorch": "xnnpack", "tflite": "cpu"}
RECIPE = "int8da-int4w-g32"
ARTIFACT = {"executorch": "model.pte", "tflite": "model.tflite"}


# ------------------------------------------------------------------ random checkpoints


def write_random_checkpoint(config: dict, folder: Path, seed: int = 0, fp32: bool = False) -> int:
    """config.json + model.safetensors (bf16 as published, or fp32; random) for `config`; returns
    the parameter count.
    Names and shapes from transformers' model on the meta device (no memory); data written
    tensor by tensor into one safetensors file (header first, then each tensor's bytes)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(config))  # a deep copy: transformers adds rope_theta into rope_scaling in place,
    # and the config.json written below must equal the published one for model_folder to reuse it
    conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items()
                                                                        if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(conf)
    tensors = [(n, tuple(p.shape)) for n, p in model.state_dict().items()
               if not (n == "lm_head.weight" and conf.tie_word_embeddings)]  # tied: saved once, as HF does
    header, off = {}, 0
    for name, shape in tensors:
        n = (4 if fp32 else 2) * math.prod(shape)
        header[name] = {"dtype": "F32" if fp32 else "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = folder / "model.safetensors.part"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            if name.endswith("norm.weight"):
                t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:  # std 0.02: the initializer_range of these configs, so activations stay finite
                t = 0.02 * torch.randn(shape, generator=gen)
            f.write(t.numpy().tobytes() if fp32 else t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
            del t
    tmp.rename(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sum(math.prod(s) for _, s in tensors)


def published_config(name: str, quick: bool) -> dict:
    """bench/configs/<name>/config.json (--quick: the tiny random Llama's)."""
    if quick:
        from slmc import api

        return {**api.tiny_llama_config(), "vocab_size": 512}
    return json.loads((HERE / "configs" / name / "config.json").read_text())


def model_folder(name: str, work: Path, quick: bool, layers: int | None = None) -> Path:
    """The random checkpoint of `name` under work/ (made once, reused by later runs); with
    `layers`, its config cut to that many decoder layers (bench/scale_calib.py), in NAME-L<layers>."""
    config = published_config(name, quick)
    if layers is not None:
        config = {**config, "num_hidden_layers": layers}
    d = work / (name if layers is None else f"{name}-L{layers}")
    if not (d / "model.safetensors").is_file() or json.loads((d / "config.json").read_text()) != config:
        print(f"== writing random {d.name} to {d} ...", flush=True)
        write_random_checkpoint(config, d)
    return d


# ------------------------------------------------------------------ workers


SAMPLED = [0.0]  # the highest VmRSS the watchdog saw: the kernel's VmHWM can miss a short peak


def watchdog(limit_mib: float, ph: Phases, result: Path) -> None:
    """End this process (exit 3) when its RSS passes limit_mib, leaving a result that says where."""
    def loop():
        while True:
            rss = status_mib("VmRSS")
            SAMPLED[0] = max(SAMPLED[0], rss)
            if rss > limit_mib:
                result.write_text(json.dumps({"error": f"RSS {rss:.0f} MiB passed the {limit_mib:.0f} MiB "
                                              f"limit during '{ph.name}'", "phases": ph.rows}))
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=loop, daemon=True).start()


def worker_compile(a) -> dict:
    ph = Phases()
    watchdog(a.rss_limit_gib * 1024, ph, Path(a.result))
    from slmc import api

    ph("compile setup")
    path, manifest = api.compile(api.CompileOptions(a.model, a.target, TARGETS[a.target], a.out, recipe=a.recipe,
                                                    max_seq_len=a.max_seq_len), progress=ph)
    ph("done")
    return {"artifact": str(path / ARTIFACT[a.target]), "params": manifest["model"]["params"],
            "phases": ph.rows, "own_peak_rss_mib": round(max(peak_rss_mib(), SAMPLED[0]), 1)}


def worker_decode(a) -> dict:
    """Greedy decode steps from an empty cache; tok/s median over repeats after a warm-up."""
    import numpy as np
    import torch

    steps, tok_s = a.steps, []
    if a.target == "executorch":
        import executorch.kernels.quantized  # noqa: F401  registers embedding_4bit & co.
        from executorch.runtime import Runtime

        ptd = Path(a.artifact).with_name("model.ptd")  # a tied float table kept beside the .pte
        prog = Runtime.get().load_program(a.artifact, data_path=str(ptd) if ptd.is_file() else None)

        def run_once():
            method, tok = prog.load_method("forward"), 1  # a fresh method: an empty cache
            t0 = time.perf_counter()
            for i in range(steps):
                out = method.execute([torch.tensor([[tok]]), torch.tensor([i])])[0]
                tok = int(out.reshape(-1).argmax())
            return time.perf_counter() - t0
    else:
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=a.artifact, num_threads=os.cpu_count())
        run = it.get_signature_runner("decode")
        ins = run.get_input_details()

        def run_once():
            feeds, tok = {k: np.zeros(d["shape"], d["dtype"]) for k, d in ins.items()}, 1
            caches = [k for k in ins if "cache" in k]
            t0 = time.perf_counter()
            for i in range(steps):
                feeds["tokens"][...] = tok
                feeds["input_pos"][...] = i
                out = run(**feeds)
                for k in caches:
                    feeds[k] = out.get(k, feeds[k])
                tok = int(np.asarray(out["logits"]).reshape(-1).argmax())
            return time.perf_counter() - t0
    for r in range(a.repeats + 1):  # repeat 0: warm-up (page faults, thread start)
        s = run_once()
        if r:
            tok_s.append(steps / s)
    return {"decode_tok_s": statistics.median(tok_s), "tok_s": tok_s}


# ------------------------------------------------------------------ driver


def measure(name: str, target: str, model_dir: Path, work: Path, a) -> dict:
    out = work / f"{name}-{target}"
    common = ["--model", str(model_dir), "--target", target, "--max-seq-len", str(a.max_seq_len),
              "--recipe", a.recipe]
    print(f"== {name} -> {target} ({a.recipe}) ...", flush=True)
    (work / f"{name}-{target}.json").unlink(missing_ok=True)
    r = spawn(__file__, ["--worker", "compile", *common, "--out", str(out), "--rss-limit-gib",
                         str(a.rss_limit_gib)], work / f"{name}-{target}.json", errors="record")
    if "error" in r:
        res = json.loads((work / f"{name}-{target}.json").read_text()) if \
            (work / f"{name}-{target}.json").is_file() else {}
        r = {**r, **res} if "phases" in res else r
        print(f"   failed: {r['error']}", flush=True)
        return r
    ptd = Path(r["artifact"]).with_name("model.ptd")
    r["artifact_bytes"] = dir_bytes(Path(r["artifact"])) + (ptd.stat().st_size if ptd.is_file() else 0)
    print(f"   {r['wall_s']} s, peak RSS {r['peak_rss_mib']} MiB, {r['artifact_bytes'] / 2**20:.0f} MiB", flush=True)
    dec = spawn(__file__, ["--worker", "decode", "--target", target, "--artifact", r["artifact"], "--steps",
                           str(a.steps), "--repeats", str(a.repeats)], work / f"{name}-{target}-dec.json",
                rusage=False, errors="record")
    r.update(decode=dec)
    print(f"   decode {dec.get('decode_tok_s', dec.get('error'))}", flush=True)
    if not a.keep:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return r


def passes_of(recipe: str, target: str) -> list[str]:
    from slmc import api

    return api.compile_passes(recipe, target, TARGETS[target])


def key(r: dict) -> tuple[str, str, str]:
    """A row is one model through one target with one recipe (rows before --recipe: RECIPE)."""
    return r["model"], r["target"], r.get("recipe", RECIPE)


def growth(rows: list[dict], key: str) -> float | None:
    """log-log slope of `key` against params between the smallest and largest model measured."""
    ok = sorted((r["params"], r[key]) for r in rows if r.get(key))
    if len(ok) < 2 or ok[0][0] == ok[-1][0]:
        return None
    (p0, v0), (p1, v1) = ok[0], ok[-1]
    return math.log(v1 / v0) / math.log(p1 / p0)


def main(a) -> None:
    stem = "scale-quick" if a.quick else "scale"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prev = json.loads((RESULTS / f"{stem}.json").read_text()) if a.append and (RESULTS / f"{stem}.json").is_file() \
        else {}
    rows = {key(r): r for r in prev.get("rows", [])}
    others = set(prev.get("other_processes", [])) | set(busy_processes())
    models = ["tiny"] if a.quick else a.models
    commit = head_commit()  # now: the workers import slmc as it is at the start
    for name in models:
        need = [t for t in a.targets if "error" in rows.get((name, t, a.recipe), {"error": ""})
                or "error" in rows[(name, t, a.recipe)].get("decode", {})]
        if not need:
            continue
        model_dir = model_folder(name, work, a.quick)
        params = weight_count(model_dir)
        for target in need:
            r = measure(name, target, model_dir, work, a)
            # the checkpoint's count: the artifact's (r["params"], manifest) counts a tied head
            # twice once quantization gives the head its own node
            r["artifact_params"] = r.pop("params", None)
            rows[(name, target, a.recipe)] = {
                "model": name, "target": target, "recipe": a.recipe, "params": params,
                "fp32_weight_mib": round(params * 4 / 2**20, 1), "commit": commit,
                "recipe_passes": " ".join(passes_of(a.recipe, target)), **r}
            others |= set(busy_processes())
            write(stem, rows, others, a)
    write(stem, rows, others, a)


def write(stem: str, rows: dict, others: set, a) -> None:
    done = [r for r in rows.values() if "error" not in r]
    grow = {}  # slopes within one target and one recipe: a recipe's passes set most of the cost
    for t, rec in sorted({key(r)[1:] for r in done}):
        rs = [{**r, "decode_tok_s": r.get("decode", {}).get("decode_tok_s")} for r in done if key(r)[1:] == (t, rec)]
        grow[f"{t} {rec}"] = {k: growth(rs, k) for k in ("wall_s", "cpu_s", "peak_rss_mib", "artifact_bytes",
                                                        "decode_tok_s")}
    write_results(stem, {"machine": machine(), "recipe": RECIPE, "max_seq_len": a.max_seq_len,
                         "decode_steps": a.steps, "repeats": a.repeats, "rss_limit_gib": a.rss_limit_gib,
                         "rows": sorted(rows.values(), key=lambda r: (r["params"], r["target"])),
                         "growth": grow, "not_run": a.not_run, "other_processes": sorted(others)}, echo=False)
    # growth slopes mix commits when the rows do: markdown() says so


def notes(r: dict) -> str | None:
    """bench/README.md's paragraph: the findings written into the results file's notes."""
    return (r.get("notes") or {}).get("text")


def _f(x, fmt="{:.1f}"):
    return "—" if x is None else fmt.format(x)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# Scale benchmark: 1B-3B configs, random weights, 8da4w (ExecuTorch XNNPACK, LiteRT CPU)", "",
             f"Recipe {r['recipe']} unless a row names another: each row's passes are listed below.", "",
             f"{m['date']} · {m['cpu']} · {m['cores']} cores · {m['mem_gib']} GiB · torch {m['torch']} · "
             f"executorch {m['executorch']} · max_seq_len {r['max_seq_len']} · decode: median of {r['repeats']} × "
             f"{r['decode_steps']} greedy steps · watchdog {r['rss_limit_gib']} GiB", "",
             "| model | target | recipe | commit | params | fp32 weights (MiB) | compile wall (s) | CPU (s) | peak RSS (MiB) "
             "| RSS / fp32 | artifact (MiB) | bytes / param | decode tok/s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        if "error" in x:
            lines.append(f"| {x['model']} | {x['target']} | {key(x)[2]} | {x.get('commit', '?')} | {x['params']:,} | "
                         f"{x['fp32_weight_mib']:.0f} | failed: {x['error']} | | | | | | |")
            continue
        rss = x["peak_rss_mib"]
        lines.append(f"| {x['model']} | {x['target']} | {key(x)[2]} | {x.get('commit', '?')} | {x['params']:,} | "
                     f"{x['fp32_weight_mib']:.0f} | {x['wall_s']:.0f} | {x['cpu_s']:.0f} | {rss:.0f} | {rss / x['fp32_weight_mib']:.2f} | "
                     f"{x['artifact_bytes'] / 2**20:.0f} | {x['artifact_bytes'] / x['params']:.3f} | "
                     f"{_f(x.get('decode', {}).get('decode_tok_s')) if 'error' not in x.get('decode', {}) else 'failed: ' + x['decode']['error']} |")
    lines += ["", "Growth with parameter count (log-log slope, smallest to largest model measured; 1.0 = linear):", "",
              "| target, recipe | compile wall | compile CPU | peak RSS | artifact | decode tok/s |", "|---|---:|---:|---:|---:|---:|"]
    for t, g in r["growth"].items():
        lines.append(f"| {t} | {_f(g['wall_s'], '{:.2f}')} | {_f(g.get('cpu_s'), '{:.2f}')} | {_f(g['peak_rss_mib'], '{:.2f}')} | "
                     f"{_f(g['artifact_bytes'], '{:.2f}')} | {_f(g['decode_tok_s'], '{:.2f}')} |")
    commits = {x.get("commit") for x in r["rows"] if "error" not in x}
    if len(commits) > 1:
        lines += ["", f"The rows come from {len(commits)} commits ({', '.join(sorted(map(str, commits)))}): the slopes "
                  "mix them, so read each row's peak against its own commit's recipe passes (below)."]
    if any(x.get("recipe_passes") for x in r["rows"]):
        lines += ["", "Recipe passes per commit and recipe:", ""] + sorted(
            {f"- {x.get('commit', '?')} {key(x)[2]}: `{x.get('recipe_passes')}`" for x in r["rows"]
             if x.get("recipe_passes")})
    if r.get("not_run"):
        lines += ["", "Not run in this results file:", ""] + [f"- {n}" for n in r["not_run"]]
    lines.append("")
    for x in r["rows"]:
        if x.get("phases"):
            lines += phase_table(f"{x['model']} → {x['target']}", x["phases"])
    return "\n".join(lines + others_seen(r["other_processes"]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=tuple(TARGETS))
    ap.add_argument("--recipe", default=RECIPE, help=f"the recipe compiled (default {RECIPE}; a row per recipe)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default 512; 128 with --quick)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-limit-gib", type=float, default=16.0, help="end a compile whose RSS passes this")
    ap.add_argument("--work", default="/tmp/slmc-scale", help="random checkpoints and artifacts (kept between runs)")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts")
    ap.add_argument("--append", action="store_true", help="keep measured rows of the last results file")
    ap.add_argument("--not-run", action="append", default=[], help="a line saying what was not run and why")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, smoke test")
    ap.add_argument("--render", action="store_true", help="only re-render results/scale*.md from the .json")
    ap.add_argument("--worker", choices=("compile", "decode"), help=argparse.SUPPRESS)
    for k in ("--model", "--target", "--out", "--result", "--artifact"):
        ap.add_argument(k, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.max_seq_len is None:
        a.max_seq_len = 128 if a.quick else 512
    if a.render:
        render("scale")
    elif a.worker:
        out = worker_compile(a) if a.worker == "compile" else worker_decode(a)
        Path(a.result).write_text(json.dumps(out))
    else:
        main(a)
