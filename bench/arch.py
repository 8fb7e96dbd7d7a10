"""The architecture passes on SmolLM2-135M: one table for arch.gqa, arch.share_layers and moe.offload.

    SLMC_CACHE=/tmp/slmc-cache OMP_NUM_THREADS=1 python bench/arch.py             # all three (hours)
    python bench/arch.py --only share             # re-run one pass's benchmark, then rebuild the table
    python bench/arch.py --assemble               # rebuild the table from the committed results only
    python bench/arch.py --quick                  # tiny random models, smoke test

Each pass has its own benchmark (bench/arch_gqa.py, arch_share.py, arch_moe.py), run here as
a subprocess so each keeps its own peak RSS and results file (results/arch_<pass>.{json,md},
with the per-pass detail). This driver then writes results/arch.{json,md}: one row per
configuration with the columns the passes share (weights, KV cache, artifact, peak RSS,
perplexity and KL against the original model, pass wall time). "-" marks a figure that
pass's benchmark does not measure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import HERE, RESULTS, MiB, render, write_results

PASSES = {"gqa": "arch_gqa", "share": "arch_share", "moe": "arch_moe"}


def _mib(v) -> float | None:
    return None if v is None else v / MiB


def rows_gqa(d: dict) -> list[dict]:
    out = []
    for r in d["rows"]:
        kv = r.get("kv_bytes_per_token")
        max_len = 2048
        out.append({"pass": "arch.gqa", "config": f"{r['variant']} ({r['kv_heads']} KV heads)",
                    "weights_mib": _mib(r.get("weight_bytes")),
                    "kv_cache_mib": _mib(kv * max_len) if kv else None, "kv_note": f"at {max_len} tokens",
                    "artifact_mib": None, "peak_rss_mib": r.get("peak_rss_mib"),
                    "ppl": r.get("perplexity"), "kl": r.get("kl"), "pass_s": r.get("pass_s")})
    return out


def rows_share(d: dict) -> list[dict]:
    return [{"pass": "arch.share_layers", "config": r["config"], "weights_mib": _mib(r.get("weight_bytes")),
             "kv_cache_mib": _mib(r.get("kv_cache_bytes")), "kv_note": f"at {d['meta'].get('max_seq_len')} tokens",
             "artifact_mib": _mib(r.get("artifact_bytes")), "peak_rss_mib": r.get("peak_rss_pass_mib"),
             "ppl": r.get("perplexity"), "kl": r.get("kl"), "pass_s": r.get("pass_seconds")}
            for r in d["rows"]]


def rows_moe(d: dict) -> list[dict]:
    out = []
    for r in d["rows"]:
        extra = []
        if r.get("decode_tok_s") is not None:
            extra.append(f"{r['decode_tok_s']:.1f} tok/s")
        if r.get("hit_rate") is not None:
            extra.append(f"hit {r['hit_rate']:.0%}")
        out.append({"pass": "moe.offload", "config": r["variant"] + (f" ({', '.join(extra)})" if extra else ""),
                    "weights_mib": r.get("ir_weights_mib"), "kv_cache_mib": r.get("kv_cache_mib"), "kv_note": "",
                    "artifact_mib": r.get("artifact_mib"), "peak_rss_mib": r.get("peak_rss_mib"),
                    "ppl": r.get("ppl"), "kl": r.get("kl_vs_dense"), "pass_s": r.get("pass_s"),
                    "decode_tok_s": r.get("decode_tok_s"), "hit_rate": r.get("hit_rate")})
    return out


READERS = {"gqa": rows_gqa, "share": rows_share, "moe": rows_moe}


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(data: dict) -> str:
    table, sources = data["rows"], data["sources"]
    lines = ["# Architecture passes on SmolLM2-135M", "",
             "One row per configuration; the per-pass files hold the detail and the settings "
             "(calibration and evaluation text, windows, machine): "
             + ", ".join(f"[{s}]({s}.md)" for s in sources.values()) + ".", "",
             "| pass | config | weights MiB | KV cache MiB | artifact MiB | peak RSS MiB | ppl | KL | pass s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['pass']} | {r['config']} | {_fmt(r['weights_mib'], '.1f')} | "
                     f"{_fmt(r['kv_cache_mib'], '.1f')} | {_fmt(r['artifact_mib'], '.1f')} | "
                     f"{_fmt(r['peak_rss_mib'], '.0f')} | {_fmt(r['ppl'], '.2f')} | {_fmt(r['kl'], '.3f')} | "
                     f"{_fmt(r['pass_s'], '.1f')} |")
    lines += ["", "KL is KL(original || transformed) per token (nats) on the evaluation text. The MoE rows "
              "compare against the upcycled dense model, not SmolLM2 itself (see arch_moe.md); their "
              "peak RSS is the ExecuTorch runner's while decoding. KV cache sizes are at each benchmark's "
              "cache length (GQA: 2048 tokens). SmolLM2 has 9 query heads in 3 KV groups, and G must "
              "divide 9, so G=1 is the only reduction arch.gqa can make on it. The share_layers rows evaluate "
              "on Mansfield Park (the GQA rows on Pride and Prejudice), hence the different original "
              "perplexity. Without retraining, merging SmolLM2's blocks or FFNs and cutting it to one KV "
              "head cost most of its quality (MobileLLM trains with sharing from the start); the lossless "
              "mode and the MoE offload change no logits beyond quantization. The GQA benchmark does not "
              "compile artifacts, so its artifact column is empty; arch_gqa.md gives the weight bytes.", ""]
    return "\n".join(lines)


def assemble(quick: bool) -> None:
    suffix = "-quick" if quick else ""
    table, sources = [], {}
    for key, stem in PASSES.items():
        f = RESULTS / f"{stem}{suffix}.json"
        if not f.is_file():
            print(f"  no {f.name} yet: run `python bench/arch.py --only {key}`", file=sys.stderr)
            continue
        sources[key] = f.stem
        table += READERS[key](json.loads(f.read_text()))
    write_results(f"arch{suffix}", {"rows": table, "sources": sources})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(PASSES)}")
    ap.add_argument("--assemble", action="store_true", help="only rebuild the table from existing results")
    ap.add_argument("--quick", action="store_true", help="tiny random models (each benchmark's --quick)")
    ap.add_argument("--render", action="store_true", help="only re-render results/*.md from the .json")
    a = ap.parse_args()
    if a.render:
        return render("arch")
    keys = a.only.split(",") if a.only else list(PASSES)
    bad = [k for k in keys if k not in PASSES]
    if bad:
        ap.error(f"unknown pass {bad[0]!r}; choose from {', '.join(PASSES)}")
    if not a.assemble:
        for k in keys:
            cmd = [sys.executable, str(HERE / f"{PASSES[k]}.py")] + (["--quick"] if a.quick else [])
            print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, cwd=HERE.parent)
    assemble(a.quick)


if __name__ == "__main__":
    main()
