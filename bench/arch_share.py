"""arch.share_layers benchmark: what block / FFN sharing buys and costs on SmolLM2-135M.

    SLMC_CACHE=/tmp/slmc-cache OMP_NUM_THREADS=1 python bench/arch_share.py
    python bench/arch_share.py --quick     # tiny random 10-layer Llama, smoke test (~12 min on 2 cores)

Per configuration (the original model, then each mode x budget), in a fresh subprocess so
peak RSS is its own: load the model, run the pass (wall time, peak RSS after it), measure
weight bytes and the KV cache (unchanged: every depth keeps its slot), evaluate perplexity,
KL(original || shared) and top-1 agreement on one novel through the reference executor
(slmc.runtime_tests.evaluate) after calibrating on another, then save the IR (ir.json +
safetensors, sharing preserved), compile it to an artifact and record its size.
`run(args)` returns the rows (for bench/arch.py); `__main__` also writes
bench/results/arch_share{,-quick}.{json,md} (`--render`: the .md again from the .json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _common import CORPUS, ROOT, MiB, peak_rss_mib, render, spawn, tiny_model, write_results

DEFAULTS = {"model": "default", "modes": "block,ffn", "budgets": "0.1,0.2", "calib": str(CORPUS / "austen_emma.txt"),
            "eval": str(CORPUS / "austen_mansfieldpark.txt"), "n_seqs": 8, "seq_len": 256, "eval_tokens": 2048,
            "window": 512, "stride": 256, "max_seq_len": 512, "target": "tflite", "backend": "cpu",
            "quick": False}


def _opt(args, name):
    return getattr(args, name, None) if getattr(args, name, None) is not None else DEFAULTS[name]


def kv_cache_bytes(ir) -> int:
    """fp32 K and V per depth at the KV spec's length (shared blocks keep their own slots)."""
    return sum(2 * ir.block_at(d).attn.n_kv_heads * ir.block_at(d).attn.head_dim * ir.kv.max_len * 4
               for d in range(ir.n_layers))


def _artifact_bytes(manifest: dict) -> int:
    name = manifest.get("artifact", "")
    return sum(n for f, n in manifest["files"].items() if f == name or f.startswith(name + "/"))


def worker(cfg: dict) -> dict:
    """One configuration, start to end, in this (fresh) process."""
    from slmc import api

    row = {"config": cfg["name"], "mode": cfg.get("mode"), "budget": cfg.get("budget")}
    src = api.resolve_model_path(cfg["model"])
    ir = api.load(src, max_seq_len=cfg["max_seq_len"])
    row["peak_rss_load_mib"] = round(peak_rss_mib(), 1)
    if cfg.get("mode"):
        spec = (f"arch.share_layers:mode={cfg['mode']},budget={cfg['budget']},calib={cfg['calib']},"
                f"n_seqs={cfg['n_seqs']},seq_len={cfg['seq_len']}")
        t0 = time.perf_counter()
        ir, logs = api.run_passes(ir, [spec])
        row["pass_seconds"] = round(time.perf_counter() - t0, 2)
        info = logs[0].info
        row.update({k: info.get(k) for k in ("pairs", "calib_error", "calib_kl", "calib_top1", "merge_wins",
                                             "calibration_seconds", "search_seconds")})
        row["shared"] = [{"depths": s["depths"], "merge": s["merge"], "error": s["error"]} for s in info["shared"]]
    else:
        row["pairs"] = 0
    row["peak_rss_pass_mib"] = round(peak_rss_mib(), 1)
    row.update({"blocks": len(ir.blocks), "layers": ir.n_layers, "params": api.param_count(ir),
                "weight_bytes": api.weight_bytes(ir), "kv_cache_bytes": kv_cache_bytes(ir)})
    tok = api.tokenizer_dir(src) / "tokenizer.json"
    ids = api.token_ids([cfg["eval"]], tok, min_tokens=cfg["window"] + 1, max_tokens=cfg["eval_tokens"],
                    what="evaluation text")
    ref = api.load(src) if cfg.get("mode") else None
    rep = api.evaluate_tokens(ids, ir, cfg["name"], ref, window=cfg["window"], stride=cfg["stride"])
    row.update({"perplexity": round(rep.perplexity, 4), "eval_tokens": rep.tokens_scored,
                "eval_seconds": rep.seconds})
    if ref is not None:
        row.update({"reference_perplexity": round(rep.reference_perplexity, 4),
                    "kl": round(rep.kl_divergence, 5), "top1": round(rep.top1_agreement, 4)})
    del ref
    with tempfile.TemporaryDirectory(prefix="slmc-share-bench-") as tmp:
        t0 = time.perf_counter()
        folder = api.save_ir(ir, Path(tmp) / "ir")
        del ir
        _, manifest = api.compile(api.CompileOptions(folder, cfg["target"], cfg["backend"], Path(tmp) / "art",
                                                     max_seq_len=cfg["max_seq_len"]))
        row.update({"artifact": manifest["artifact"], "artifact_bytes": _artifact_bytes(manifest),
                    "compile_seconds": round(time.perf_counter() - t0, 2)})
    row["peak_rss_total_mib"] = round(peak_rss_mib(), 1)
    return row


def _quick_model(work: Path) -> str:
    return tiny_model(work, num_hidden_layers=10, hidden_size=128, intermediate_size=256)


def settings(args) -> dict:
    """What every configuration shares (--quick shrinks the token counts for the tiny model)."""
    common = {k: _opt(args, k) for k in ("calib", "eval", "n_seqs", "seq_len", "eval_tokens", "window", "stride",
                                         "max_seq_len", "target", "backend")}
    if _opt(args, "quick"):
        common.update(n_seqs=4, seq_len=64, eval_tokens=512, window=128, stride=64, max_seq_len=160)
    return common


def configs(args, model: str) -> list[dict]:
    common = settings(args)
    out = [{"name": "original", "model": model, **common}]
    for mode in str(_opt(args, "modes")).split(","):
        for b in str(_opt(args, "budgets")).split(","):
            out.append({"name": f"{mode} budget={float(b):g}", "model": model, "mode": mode, "budget": float(b),
                        **common})
    return out


def run(args) -> list[dict]:
    """One row per configuration (the original model first); each in its own subprocess."""
    work = Path(tempfile.mkdtemp(prefix="slmc-arch-share-"))
    model = _quick_model(work) if _opt(args, "quick") else str(_opt(args, "model"))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # finished rows, keyed by their settings: --resume reuses them after a crash (a run is ~1 h)
    cache = Path(tempfile.gettempdir()) / f"slmc-arch-share-rows{'-quick' if _opt(args, 'quick') else ''}.json"
    done = json.loads(cache.read_text()) if getattr(args, "resume", False) and cache.is_file() else {}
    rows = []
    for cfg in configs(args, model):
        key = json.dumps({k: v for k, v in cfg.items() if k != "model" or not _opt(args, "quick")}, sort_keys=True)
        if key in done:
            rows.append(done[key])
            continue
        row = spawn(__file__, ["--worker", json.dumps(cfg)], work / "row.json", env=env, cwd=ROOT, errors="record")
        if "error" in row:
            raise RuntimeError(f"{cfg['name']} failed: {row['error']}")
        print(f"  {row['config']}: {row['weight_bytes'] / MiB:.1f} MiB weights, ppl {row['perplexity']}, "
              f"{row['wall_s']} s", file=sys.stderr, flush=True)
        rows.append(row)
        done[key] = row
        cache.write_text(json.dumps(done))
    base = rows[0]
    for r in rows:
        r["weight_bytes_saved"] = base["weight_bytes"] - r["weight_bytes"]
        r["artifact_bytes_saved"] = base["artifact_bytes"] - r["artifact_bytes"]
        r["baseline_perplexity"] = base["perplexity"]
    return rows


def markdown(data: dict) -> str:
    rows, meta = data["rows"], data["meta"]
    lines = [f"# arch.share_layers on {meta['model']}", "",
             f"{meta['date']} · {meta['machine']} · calibration: {meta['calib']} ({meta['n_seqs']}x{meta['seq_len']} "
             f"tokens) · evaluation: {meta['eval']} ({rows[0]['eval_tokens']} tokens scored, window "
             f"{meta['window']}, stride {meta['stride']}) · artifact: {meta['target']}/{meta['backend']} "
             f"(max_seq_len {meta['max_seq_len']})", "",
             "| config | pairs | blocks | weights MiB | saved MiB | KV cache MiB | artifact MiB | artifact saved MiB "
             "| ppl | Δppl | KL | top-1 | calib KL | merges chosen | pass s | peak RSS MiB (pass) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        def f(key, fmt="{:.4f}"):
            return fmt.format(r[key]) if r.get(key) is not None else "-"
        merges = ", ".join(f"{s['merge']}" for s in r.get("shared") or []) or "-"
        lines.append(
            f"| {r['config']} | {r['pairs']} | {r['blocks']} | {r['weight_bytes'] / MiB:.1f} | "
            f"{r['weight_bytes_saved'] / MiB:.1f} | {r['kv_cache_bytes'] / MiB:.1f} | {r['artifact_bytes'] / MiB:.1f} | "
            f"{r['artifact_bytes_saved'] / MiB:.1f} | {r['perplexity']:.3f} | "
            f"{r['perplexity'] - r['baseline_perplexity']:+.3f} | {f('kl')} | {f('top1')} | {f('calib_kl')} | "
            f"{merges} | {f('pass_seconds', '{:.1f}')} | {r['peak_rss_pass_mib']:.0f} |")
    lines += ["", "Pairs chosen (depths, merge, calibration error at the pair's output):", ""]
    for r in rows[1:]:
        pairs = "; ".join(f"{s['depths']} {s['merge']} {s['error']:.4f}" for s in r.get("shared") or [])
        lines.append(f"- {r['config']}: {pairs or 'none'} (merge wins over all candidates: {r.get('merge_wins')})")
    lines += ["", "KL is KL(original || shared) per token in nats; ppl/KL/top-1 on the evaluation novel, "
              "calib KL on the calibration windows. Peak RSS is each configuration's own process "
              "after loading and running the pass (the artifact compile afterwards peaks higher). "
              "The KV cache does not shrink: every depth keeps its own slot."]
    return "\n".join(lines) + "\n"


def main(a) -> None:
    rows = run(a)
    meta = {"model": "tiny random llama (--quick)" if a.quick else a.model,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()} · {os.cpu_count()} cores", **settings(a)}
    meta["calib"], meta["eval"] = Path(meta["calib"]).name, Path(meta["eval"]).name
    write_results("arch_share-quick" if a.quick else "arch_share", {"meta": meta, "rows": rows})


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k, v in DEFAULTS.items():
        if k == "quick":
            ap.add_argument("--quick", action="store_true", help="tiny random Llama, for a fast smoke test")
        else:
            ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--resume", action="store_true", help="reuse the rows a crashed run finished")
    ap.add_argument("--render", action="store_true", help="only re-render results/*.md from the .json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap


if __name__ == "__main__":
    args = parser().parse_args()
    if args.render:
        render("arch_share")
    elif args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker))))
    else:
        main(args)
