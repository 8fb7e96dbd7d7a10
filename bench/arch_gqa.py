"""arch.gqa benchmark: KV heads merged to G groups, what it saves and what it costs.

    SLMC_CACHE=/tmp/slmc-cache .venv/bin/python bench/arch_gqa.py          # SmolLM2-135M, G=1
    .venv/bin/python bench/arch_gqa.py --quick                              # tiny random MHA Llama

Variants: the original model; mean pooling of contiguous heads (Ainslie et al.); similarity
grouping without refit; similarity grouping with the least-squares refit. The pass calibrates
on one novel of ../shared/corpus (--calib) and every variant is scored on another (--eval):
perplexity, KL(original || variant) per token and top-1 agreement with the original, through
slmc.runtime_tests.evaluate (reference executor, fp32). Each variant runs in a fresh
subprocess: pass wall time, peak RSS after the pass (in-worker) and for the whole worker
(os.wait4) are its own. Writes bench/results/arch_gqa{,-quick}.{json,md} (`--render`: the .md
again from the .json).

`run(args) -> list[dict]` is what bench/arch.py calls; args is a Namespace or dict with the
options below (missing ones take their defaults).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

from _common import CORPUS, ROOT, cpu_name, peak_rss_mib, render, spawn, tiny_model, write_results

VARIANTS = {  # name -> pass options after kv_groups (None: the original model)
    "original": None,
    "mean": "method=mean,refit=false",
    "similarity": "method=similarity,refit=false",
    "similarity+refit": "method=similarity,refit=true",
}
DEFAULTS = {"model": "default", "kv_groups": 1, "calib": str(CORPUS / "austen_emma.txt"),
            "eval": str(CORPUS / "austen_prideprejudice.txt"), "n_seqs": 16, "seq_len": 256,
            "eval_tokens": 2048, "window": 512, "stride": 256, "threads": 1, "quick": False,
            "variants": ",".join(VARIANTS)}


QUICK = {"n_seqs": 8, "seq_len": 64, "eval_tokens": 600, "window": 128, "stride": 64}


def options(args) -> dict:
    """DEFAULTS, overridden by what args (a Namespace or dict) sets, then --quick's sizes."""
    given = vars(args) if not isinstance(args, dict) else args
    a = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    return {**a, **QUICK} if a["quick"] else a


def worker(a: dict) -> dict:
    """One variant: load, run the pass (timed), then score it on the eval text."""
    import torch

    from slmc import api

    torch.set_num_threads(a["threads"])
    src = api.resolve_model_path(a["model"])
    model = api.load(src)
    out = {"variant": a["variant"], "kv_bytes_per_token_before": api.kv_bytes_per_token(model)}
    t0 = time.perf_counter()
    info = {}
    if a["spec"]:
        spec = (f"arch.gqa:kv_groups={a['kv_groups']},{a['spec']},calib={a['calib']},"
                f"n_seqs={a['n_seqs']},seq_len={a['seq_len']}")
        model, logs = api.run_passes(model, [spec])
        info = logs[0].info
        out["pass"] = spec
    out.update(pass_s=round(time.perf_counter() - t0, 2), peak_rss_pass_mib=round(peak_rss_mib(), 1),
               kv_bytes_per_token=api.kv_bytes_per_token(model), weight_bytes=api.weight_bytes(model),
               kv_heads=model.blocks[0].attn.n_kv_heads,
               calib_error_mean_pool=info.get("calib_error_mean_pool"), calib_error=info.get("calib_error"),
               layers_refit=info.get("layers_refit"))
    ids = api.token_ids([a["eval"]], src / "tokenizer.json", min_tokens=a["window"] + 1,
                    max_tokens=a["eval_tokens"], what="evaluation text")
    ref = api.load(src) if a["spec"] else None
    r = api.evaluate_tokens(ids, model, a["variant"], ref, window=a["window"], stride=a["stride"]).to_dict()
    out.update(tokens_scored=r["tokens_scored"], perplexity=r["perplexity"],
               kl=r["kl_divergence"] if ref is not None else 0.0,
               top1=r["top1_agreement"] if ref is not None else 1.0, eval_s=r["seconds"])
    return out


def run_worker(a: dict, work: Path) -> dict:
    """A worker in a fresh interpreter; adds its wall time, CPU time and whole-process peak RSS."""
    res = work / f"{a['variant'].replace('+', '_')}.json"
    return spawn(__file__, ["--worker", json.dumps(a)], res, env=dict(os.environ, OMP_NUM_THREADS=str(a["threads"])),
                 cwd=ROOT)


def _quick_model(work: Path) -> tuple[str, str, str]:
    """A tiny random MHA Llama (4 query heads, 4 KV heads) and two ASCII texts."""
    d = tiny_model(work, "tiny-mha", num_key_value_heads=4)
    texts = []
    for name in ("austen_emma.txt", "austen_prideprejudice.txt"):
        t = work / name
        t.write_text((CORPUS / name).read_text(encoding="utf-8")[20000:60000].encode("ascii", "ignore").decode())
        texts.append(str(t))
    return d, *texts


def run(args) -> list[dict]:
    a = options(args)
    os.environ.setdefault("SLMC_CACHE", "/tmp/slmc-cache")
    work = Path(tempfile.mkdtemp(prefix="slmc-bench-gqa-"))
    if a["quick"]:
        a["model"], a["calib"], a["eval"] = _quick_model(work)
    rows = []
    for name in a["variants"].split(","):
        print(f"== arch.gqa bench: {name}", flush=True)
        rows.append(run_worker({**a, "variant": name, "spec": VARIANTS[name]}, work))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["perplexity"] for r in rows if r["variant"] == "original"), None)
    for r in rows:
        r.update(model=a["model"], kv_groups=a["kv_groups"] if r["variant"] != "original" else None,
                 ppl_ratio=round(r["perplexity"] / base, 3) if base else None)
    return rows


def markdown(data: dict) -> str:
    rows, meta = data["rows"], data["meta"]
    lines = [f"# arch.gqa on {meta['model_name']}: KV heads to kv_groups={meta['kv_groups']}", "",
             f"{meta['date']} · {meta['cpu']} · {meta['cores']} cores ({meta['threads']} torch thread) · "
             f"calibration: {meta['calib']} ({meta['n_seqs']}x{meta['seq_len']} tokens) · "
             f"evaluation: {meta['eval']} ({rows[0]['tokens_scored']} tokens scored, window "
             f"{meta['window']}, stride {meta['stride']}) · fp32 KV cache", "",
             "| variant | KV heads | KV bytes/token | KV cache @2048 (MiB) | weights (MiB) | ppl | ppl / orig "
             "| KL (nats/tok) | top-1 | calib err mean-pool → final | pass (s) | pass peak RSS (MiB) "
             "| peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        err = (f"{r['calib_error_mean_pool']:.3f} → {r['calib_error']:.3f}"
               if r.get("calib_error") is not None else "—")
        lines.append(f"| {r['variant']} | {r['kv_heads']} | {r['kv_bytes_per_token']:,} | "
                     f"{r['kv_bytes_per_token'] * 2048 / 2**20:.1f} | {r['weight_bytes'] / 2**20:.1f} | "
                     f"{r['perplexity']:.2f} | {r['ppl_ratio'] if r['ppl_ratio'] is not None else '—'} | "
                     f"{r['kl']:.3f} | {r['top1']:.3f} | {err} | {r['pass_s']:.1f} | "
                     f"{r['peak_rss_pass_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
    lines += ["", "calib err: the pass's mean relative squared error of each layer's attention output on "
              "calibration data (mean pooling vs the chosen weights, same inputs; with the refit those inputs "
              "come from the refit earlier layers, so its mean-pool figure differs from the mean row's). Each variant runs in its "
              "own process; pass peak RSS is measured in-worker after the pass, peak RSS over the whole "
              "worker (which also holds the original model for KL). The pass reads the weights on first "
              "use, so its peak RSS includes materializing the model (plus tokenizing the calibration novel).", ""]
    if meta["kv_groups"] == 1:
        lines += ["With kv_groups=1 all query heads form one group, so similarity grouping has nothing to "
                  "choose and equals mean pooling; only the refit changes the result.", ""]
    return "\n".join(lines)


def meta_for(a: dict, rows: list[dict]) -> dict:
    cpu = cpu_name()
    name = "tiny random MHA llama (--quick)" if a["quick"] else (
        "SmolLM2-135M-Instruct" if a["model"] == "default" else Path(a["model"]).name)
    return {"model_name": name, "kv_groups": a["kv_groups"], "date": datetime.datetime.now().isoformat("T", "seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "threads": a["threads"],
            "calib": Path(a["calib"]).name, "eval": Path(a["eval"]).name, "n_seqs": a["n_seqs"],
            "seq_len": a["seq_len"], "window": a["window"], "stride": a["stride"]}


def main(ns: argparse.Namespace) -> None:
    a = options(ns)
    rows = run(ns)
    meta = meta_for(a, rows)
    write_results("arch_gqa-quick" if a["quick"] else "arch_gqa", {"meta": meta, "rows": rows})


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF folder, or 'default' (SmolLM2-135M-Instruct)")
    ap.add_argument("--kv-groups", type=int, help="G (default 1)")
    ap.add_argument("--calib", help="calibration text (default: Emma)")
    ap.add_argument("--eval", help="evaluation text (default: Pride and Prejudice)")
    ap.add_argument("--n-seqs", type=int, help="calibration sequences (default 16)")
    ap.add_argument("--seq-len", type=int, help="calibration sequence length (default 256)")
    ap.add_argument("--eval-tokens", type=int, help="evaluation tokens (default 2048)")
    ap.add_argument("--window", type=int)
    ap.add_argument("--stride", type=int)
    ap.add_argument("--threads", type=int, help="torch threads per worker (default 1)")
    ap.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--quick", action="store_true", default=None, help="tiny random model, ~1 min")
    ap.add_argument("--render", action="store_true", help="only re-render results/*.md from the .json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap


if __name__ == "__main__":
    ns = parser().parse_args()
    if ns.render:
        render("arch_gqa")
    elif ns.worker:
        Path(ns.result).write_text(json.dumps(worker(json.loads(ns.worker))))
    else:
        main(ns)
