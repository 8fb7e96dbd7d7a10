"""moe.offload benchmark: SmolLM2-135M upcycled into a 4-expert, top-2 MoE, offloaded.

    SLMC_CACHE=/tmp/slmc-cache python bench/arch_moe.py [--layers 30]   # the full model
    python bench/arch_moe.py --quick                                   # 2 layers, smoke test

The MoE is built here, as an IR transformation (no training):
- the first `--layers` blocks of SmolLM2-135M-Instruct (all 30 unless scaled down);
- each MLP becomes `--experts` copies, each perturbed by Gaussian noise of `--noise` x the
  weight's std, so experts differ;
- each router is initialised from clustering: spherical k-means (k = experts) of the
  layer's FFN inputs on calibration text (Austen's *Emma*), router rows = centroids scaled
  so logits have unit std. Tokens then route by which cluster they fall in, as a trained
  router would, rather than at random.
Then `moe.offload` (4-bit experts, 8-bit dynamic activations, float backbone, calibrated
on *Emma*) and the ExecuTorch/XNNPACK offload layout. Measured:
- quality: perplexity on held-out text (*Northanger Abbey*) of the dense truncated model,
  the float MoE and the offloaded 4-bit MoE (reference executor), KL vs the dense model;
- runtime (each in a fresh process, slmc's runner on executorch.runtime): peak RSS with
  everything resident (K = all experts, all preloaded) vs offload at several K, LRU hit
  rate with and without prediction, bytes read from expert files per decoded token, decode tok/s;
- a policy simulation on the routing trace of the held-out text (the runner's own
  ExpertCache and predictor, more tokens than the runtime runs can afford).
Writes bench/results/arch_moe{,-quick}.{json,md} (`--render`: the .md again from the .json).
`run(args)` returns the table rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

from _common import CORPUS, machine, render, spawn, status_mib, write_results

DEFAULTS = dict(quick=False, layers=30, experts=4, top_k=2, noise=0.02, backbone_bits=8, ends_bits=8,
                reuse_artifact=False, max_seq_len=256, calib_seqs=16,
                calib_len=128, eval_tokens=2048, decode_steps=48, ks="", work="/tmp/slmc-bench-moe",
                calib_text=str(CORPUS / "austen_emma.txt"), eval_text=str(CORPUS / "austen_northangerabbey.txt"))


# ------------------------------------------------------------------ building the MoE


def spherical_kmeans(x, k: int, seed: int = 0, iters: int = 25):
    import torch

    x = torch.nn.functional.normalize(x.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (x @ c.T).argmax(-1)
        for j in range(k):
            members = x[assign == j]
            c[j] = torch.nn.functional.normalize(members.sum(0), dim=0) if len(members) else x[
                torch.randint(len(x), (1,), generator=g)][0]
    return c


def upcycle(ir, n_layers: int, n_experts: int, top_k: int, noise: float, calib_ids, seed: int = 0):
    """Keep the first n_layers blocks; each MLP -> n_experts noisy copies + a clustered router."""
    import torch

    from slmc import api

    ir.layers, ir.blocks = list(range(n_layers)), [ir.block_at(d) for d in range(n_layers)]
    g = torch.Generator().manual_seed(seed)

    def noisy(lin):
        w = lin.weight.float()
        return api.Linear(api.Weight(w + noise * w.std() * torch.randn(w.shape, generator=g)))

    # every depth clusters the dense model's activations (computed before any MLP is replaced)
    inputs = api.ffn_inputs(ir, calib_ids)
    with torch.no_grad():
        for b, n in zip(ir.blocks, inputs):
            dense = b.ffn
            flat = n.reshape(-1, n.shape[-1])
            c = spherical_kmeans(flat, n_experts, seed)
            c = c / (flat @ c.T).std()
            parts = [nm for nm in ("gate", "up", "gate_up") if getattr(dense, nm) is not None]
            experts = [api.MLP(down=noisy(dense.down), act=dense.act, **{nm: noisy(getattr(dense, nm)) for nm in parts})
                       for _ in range(n_experts)]
            b.ffn = api.MoE(router=api.Linear(api.Weight(c)), experts=experts, top_k=top_k, norm_topk_prob=True)
    ir.architecture = f"{ir.architecture} upcycled {n_experts}x top-{top_k} (slmc bench)"
    return ir


# ------------------------------------------------------------------ runtime worker (fresh process)


def worker_run(a) -> dict:
    import importlib

    from slmc import api

    for m in ("executorch.kernels.quantized", "executorch.runtime"):  # the runner's imports, before measuring
        importlib.import_module(m)

    manifest = json.loads((Path(a.folder) / "manifest.json").read_text())
    rss0 = status_mib("VmRSS")  # python + torch + executorch, before any model byte
    s = api.moe_session(a.folder, manifest, cache_experts=a.k, predict=bool(a.predict))
    if a.all_resident:
        for L in manifest["moe_offload"]["layers"]:
            for e in range(len(L["experts"])):
                s.cache.preload((L["depth"], e))
    ids = json.loads(Path(a.prompt_file).read_text())
    t0 = time.perf_counter()
    logits = s.step(ids, 0)
    t1 = time.perf_counter()
    before = s.stats()
    out = [int(logits.argmax())]
    for i in range(a.steps - 1):
        out.append(int(s.step([out[-1]], len(ids) + i).argmax()))
    t2 = time.perf_counter()
    after = s.stats()
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return {"rss_before_model_mib": round(rss0, 1), "prefill_s": round(t1 - t0, 3),
            "decode_tok_s": round((a.steps - 1) / (t2 - t1), 2), "tokens": out,
            "decode_hit_rate": hits / max(hits + misses, 1),
            "decode_bytes_per_token": (after["bytes_read"] - before["bytes_read"]) / (a.steps - 1),
            "decode_preloads_per_token": (after["preloads"] - before["preloads"]) / (a.steps - 1),
            "max_resident": after["max_resident"], "total": after, "peak_rss_mib": round(status_mib("VmHWM"), 1)}


def run_worker(args: list[str], result: Path) -> dict:
    """A runtime worker in a fresh process; its peak RSS is its own (VmHWM, see status_mib)."""
    out = spawn(__file__, args, result, rusage=False,
                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    out["model_rss_mib"] = round(out["peak_rss_mib"] - out["rss_before_model_mib"], 1)
    return out


# ------------------------------------------------------------------ the benchmark


def simulate(routes: dict, transitions: dict, depths: list[int], k: int, predict: bool) -> dict:
    """The runner's cache policy (serve_layer/after_layer) over a routing trace, token by
    token; routed experts weigh equally in the prediction (the trace keeps only which)."""
    import torch

    from slmc import api

    c = api.ExpertCache(k, lambda key: key, lambda key: 1)
    n_tok = len(routes[depths[0]])
    for t in range(n_tok):
        for i, d in enumerate(depths):
            picked = routes[d][t]
            api.serve_layer(c, d, picked.tolist(), lambda e, loaded: None)
            nxt = depths[i + 1] if predict and i + 1 < len(depths) else None
            api.after_layer(c, d, nxt, transitions[d], picked, torch.full((len(picked),), 1.0 / len(picked)),
                        len(picked))
    s = c.stats
    return {"k": k, "predict": predict, "hit_rate": round(s.hit_rate, 4),
            "loads_per_token": round((s.misses + s.preloads) / n_tok, 2),
            "wasted_preloads_per_token": round((s.preloads - s.preloads_used) / n_tok, 2)}


def run(args) -> list[dict]:
    import torch

    a = argparse.Namespace(**{**DEFAULTS, **{k: v for k, v in vars(args).items() if v is not None}})
    if a.quick:
        a.layers, a.calib_seqs, a.calib_len, a.eval_tokens, a.decode_steps = min(a.layers, 2), 4, 64, 256, 16
    os.environ.setdefault("SLMC_CACHE", "/tmp/slmc-cache")
    from slmc import api

    torch.manual_seed(0)
    work = Path(a.work) / ("quick" if a.quick else f"L{a.layers}")
    work.mkdir(parents=True, exist_ok=True)
    src = api.resolve_model_path("default")
    tok = src / "tokenizer.json"
    calib = torch.tensor(api.token_ids([a.calib_text], tok, a.calib_seqs * a.calib_len)[: a.calib_seqs * a.calib_len])
    held = api.token_ids([a.eval_text], tok, a.eval_tokens)[: a.eval_tokens]
    dense = api.load(src, max_seq_len=a.max_seq_len)
    dense.layers, dense.blocks = list(range(a.layers)), [dense.block_at(d) for d in range(a.layers)]
    t0 = time.perf_counter()
    moe = upcycle(copy.deepcopy(dense), a.layers, a.experts, a.top_k, a.noise, calib.view(a.calib_seqs, -1))
    t_up = time.perf_counter() - t0
    total = a.layers * a.experts
    k_plan = max(a.top_k, total // 4)
    g = dense.hidden_size  # 8-bit: one group per row (XNNPACK's qc8w); SmolLM2's backbone linears all read H
    passes = [f"moe.offload:cache_experts={k_plan},backbone_bits={a.backbone_bits},backbone_group_size={g},"
              f"calib={a.calib_text},n_seqs={a.calib_seqs},seq_len={a.calib_len}"]
    if a.ends_bits:  # embedding and head: quant.rtn after the offload pass (it skips what is quantized)
        passes.append(f"quant.rtn:bits=8,group_size={g},embed_bits={a.ends_bits},head_bits={a.ends_bits},"
                      "act_bits=8,scale_dtype=bfloat16")
    t0 = time.perf_counter()
    off, logs = api.run_passes(copy.deepcopy(moe), passes + ["canon.fuse_projections"])
    t_pass = time.perf_counter() - t0
    quality = {name: api.evaluate_tokens(held, m, name, dense, window=min(256, a.max_seq_len), stride=128).to_dict()
               for name, m in (("dense", dense), ("moe float", moe), ("offloaded, quantized", off))}
    # routing trace of the held-out text, for the policy simulation
    n = len(held) // a.calib_len
    routes = api.expert_routes(off, torch.tensor(held[: n * a.calib_len]).view(n, -1))
    depths = sorted(routes)
    trans = {d: off.block_at(d).ffn.offload.transition for d in depths}

    folder = work / "artifact"
    old = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    reusable = old.get("bench_passes") == passes and "compile_seconds" in old
    if a.reuse_artifact and reusable:  # same IR pipeline: skip a half-hour lowering
        print(f"reusing {folder} (lowered in {old['compile_seconds']} s)", flush=True)
        manifest = old
    else:
        t0 = time.perf_counter()

        def step(msg: str) -> None:
            print(f"  [{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

        _, manifest = api.compile_ir(off, "executorch", "xnnpack", folder, tokenizer=src, progress=step,
                                     extra={"bench_passes": passes})
    t_lower = round(manifest["compile_seconds"], 1)  # the lowering alone, as the manifest records it
    tokenizer = set((manifest.get("tokenizer") or {}).get("files", []))
    plan, sizes = manifest["moe_offload"], {n: b for n, b in manifest["files"].items() if n not in tokenizer}

    prompt = api.token_ids([a.eval_text], tok, a.eval_tokens + 32)[a.eval_tokens:a.eval_tokens + 32]  # unseen text
    pf = work / "prompt.json"
    pf.write_text(json.dumps(prompt))
    ks = [int(k) for k in a.ks.split(",")] if a.ks else sorted({a.top_k, max(a.top_k, total // 8),
                                                               max(a.top_k, total // 4), total // 2, total * 3 // 4})
    configs = [("all resident", total, 1, 1)] + [(f"offload K={k}", k, p, 0) for k in ks for p in (0, 1)]
    rows, greedy = [], {}
    for name, k, predict, allres in configs:
        print(f"run {name} predict={predict}", flush=True)
        r = run_worker(["--worker", "run", "--folder", str(folder), "--k", str(k), "--predict", str(predict),
                   "--all-resident", str(allres), "--prompt-file", str(pf), "--steps", str(a.decode_steps)],
                       work / "result.json")
        greedy[name, predict] = r["tokens"]
        rows.append({"pass": "moe.offload", "variant": name + ("" if allres else (" +predict" if predict else " LRU")),
                     "cache_experts": k, "resident_expert_share": round(min(k, total) / total, 3),
                     "predict": bool(predict), "peak_rss_mib": r["peak_rss_mib"], "model_rss_mib": r["model_rss_mib"],
                     "decode_tok_s": r["decode_tok_s"], "hit_rate": round(r["decode_hit_rate"], 4),
                     "bytes_read_per_token": round(r["decode_bytes_per_token"]),
                     "preloads_per_token": round(r["decode_preloads_per_token"], 2),
                     "max_resident": r["max_resident"]})
    same = len({tuple(v) for v in greedy.values()}) == 1
    common = {"layers": a.layers, "experts_per_layer": a.experts, "top_k": a.top_k, "routed_experts": total,
              "artifact_mib": round(sum(sizes.values()) / 2**20, 2),
              "backbone_mib": round(plan["backbone_bytes"] / 2**20, 2),
              "expert_file_kib": round(plan["layers"][0]["expert_bytes"][0] / 1024, 1),
              "ir_weights_mib": round(api.weight_bytes(off) / 2**20, 2),
              "expert_weights_mib": round(plan["expert_weight_bytes"] / 2**20, 2),
              "backbone_weights_mib": round(plan["backbone_weight_bytes"] / 2**20, 2),
              "kv_cache_mib": round(sum(2 * b.attn.n_kv_heads * b.attn.head_dim * a.max_seq_len * 4
                                       for b in map(off.block_at, range(off.n_layers))) / 2**20, 2),
              "ppl": round(quality["offloaded, quantized"]["perplexity"], 3),
              "kl_vs_dense": round(quality["offloaded, quantized"]["kl_divergence"], 4),
              "pass_s": round(t_pass, 1), "upcycle_s": round(t_up, 1), "lower_s": round(t_lower, 1)}
    for r in rows:
        r.update(common)
    sim = [simulate(routes, trans, depths, k, p) for k in ks for p in (False, True)]
    report = {"machine": machine(), "setup": {**vars(a), "plan_cache_experts": k_plan, "passes": passes},
              "pass_info": logs[0].info, "quality": quality, "rows": rows, "simulation": sim,
              "greedy_tokens_equal_across_runs": same, "trace_tokens": n * a.calib_len}
    write_results("arch_moe-quick" if a.quick else "arch_moe", report, echo=False)
    return rows


def markdown(rep: dict) -> str:
    s, c = rep["setup"], rep["rows"][0]
    full = " (the full model)" if s["layers"] == 30 else " (scaled down from 30 layers: compile time on this host)"
    q = rep["quality"]
    # results of runs before backbone/ends quantization and the weight split were recorded lack those fields
    bb, eb = s.get("backbone_bits"), s.get("ends_bits")
    backbone = f"backbone linears {bb}-bit per channel" if bb else "float backbone linears"
    ends = f"embedding and head {eb}-bit" if eb else "float embedding and head"
    split = (f" (IR weights: experts {c['expert_weights_mib']} MiB, the rest {c['backbone_weights_mib']} MiB)"
             if "expert_weights_mib" in c else "")
    passes = f" Passes: `{'` then `'.join(s['passes'])}`." if "passes" in s else ""
    lines = [
        f"# moe.offload on SmolLM2-135M upcycled: {c['layers']} layers{full}, {c['experts_per_layer']} experts, "
        f"top-{c['top_k']}",
        "",
        f"{rep['machine']['date']}, {rep['machine']['cores']} cores (shared host: tok/s are noisy). Experts 4-bit "
        f"g32, {backbone}, {ends}, int8 dynamic activations (XNNPACK 8da4w{'/8da8w' if bb or eb else ''}); "
        f"{c['routed_experts']} routed experts, "
        f"one `.pte` each ({c['expert_file_kib']} KiB); backbone {c['backbone_mib']} MiB; artifact "
        f"{c['artifact_mib']} MiB{split}; "
        f"KV cache {c['kv_cache_mib']} MiB at max_len {s['max_seq_len']}. Passes {c['pass_s']} s, lowering "
        f"{c['lower_s']} s.{passes}",
        "",
        "## Quality (reference executor, held-out text, "
        f"{q['dense']['tokens_scored']} tokens)",
        "",
        "| model | perplexity | KL vs dense | top-1 vs dense |",
        "|---|---:|---:|---:|",
    ]
    for name, r in q.items():
        lines.append(f"| {name} | {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | {r['top1_agreement']:.1%} |")
    lines += ["", f"## Runtime (slmc's runner on executorch.runtime, {s['decode_steps']} greedy decode steps "
              "after a 32-token prompt, each row a fresh process)", "",
              "| variant | resident share | peak RSS MiB | model RSS MiB | hit rate | expert bytes read / token | "
              "preloads / token | decode tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep["rows"]:
        lines.append(f"| {r['variant']} | {r['resident_expert_share']:.0%} | {r['peak_rss_mib']:.0f} | "
                     f"{r['model_rss_mib']:.0f} | {r['hit_rate']:.1%} | {r['bytes_read_per_token'] / 1024:.0f} KiB | "
                     f"{r['preloads_per_token']} | {r['decode_tok_s']} |")
    full_row = next(r for r in rep["rows"] if r["variant"] == "all resident")
    saved = [f"K={r['cache_experts']} ({r['resident_expert_share']:.0%} of experts): {r['model_rss_mib']:.0f} MiB "
             f"({1 - r['model_rss_mib'] / full_row['model_rss_mib']:.0%} less)" for r in rep["rows"] if r["predict"]
             and r["variant"] != "all resident"]
    lines += ["", f"Greedy tokens identical across all runs: {'yes' if rep['greedy_tokens_equal_across_runs'] else 'NO'}. "
              "Model RSS = peak RSS minus the process's RSS before loading the model (python, torch, executorch). "
              f"Model RSS with everything resident: {full_row['model_rss_mib']:.0f} MiB; with offload "
              + "; ".join(saved) + ". Hit rate = routed-expert requests served by a resident expert (kept or "
              "preloaded). Bytes read count every expert file loaded, preloads included; the runner loads "
              "synchronously, so decode tok/s pays for every load (on a phone a preload would overlap the "
              "next layer's attention).",
              "", f"## Cache policy on the held-out routing trace ({rep['trace_tokens']} tokens, simulated with "
              "the runner's ExpertCache and predictor)", "",
              "| K | policy | hit rate | expert loads / token | wasted preloads / token |", "|---:|---|---:|---:|---:|"]
    for r in rep["simulation"]:
        lines.append(f"| {r['k']} | {'LRU + predict' if r['predict'] else 'LRU'} | {r['hit_rate']:.1%} | "
                     f"{r['loads_per_token']:.2f} | {r['wasted_preloads_per_token']:.2f} |")
    lines += ["", f"Predictor recall on the calibration text (share of next-layer experts named by the "
              f"top-{c['top_k']} guess): {rep['pass_info']['predictor_recall']:.1%}.", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reuse-artifact", action="store_true", help="keep the lowered artifact of an identical run")
    for k, v in DEFAULTS.items():
        if k not in ("quick", "reuse_artifact"):
            p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None)
    p.add_argument("--render", action="store_true", help="only re-render results/*.md from the .json")
    p.add_argument("--worker", default=None)
    p.add_argument("--folder"), p.add_argument("--k", type=int), p.add_argument("--predict", type=int)
    p.add_argument("--all-resident", type=int, default=0), p.add_argument("--prompt-file")
    p.add_argument("--steps", type=int), p.add_argument("--result")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.render:
        render("arch_moe")
    elif args.worker == "run":
        Path(args.result).write_text(json.dumps(worker_run(args)))
    else:
        for row in run(args):
            print(row)
