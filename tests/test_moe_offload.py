"""moe.offload: the pass's statistics, bad input, the lazy-loading ExecuTorch layout and the
reference runner (LRU bound, predictive preloading, logits against the reference executor).

One float artifact (tiny Mixtral, portable backend: fast to lower, exact tolerance) serves
most tests; one 4-bit-expert artifact (tiny Qwen2-MoE on XNNPACK) checks the realistic path.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from slmc import api
from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.families import FAMILIES, load_all
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import MoE, QuantWeight, Weight
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.printer import print_model
from slmc.compiler.serialize import load_ir, save_ir
from slmc.passes.moe_offload import statistics
from slmc.targets.executorch.moe_runner import ExpertCache, MoEOffloadSession, after_layer, serve_layer

load_all()
CALIB = "n_seqs=4,seq_len=32"


def _make(tmp_path_factory, family: str, **overrides):
    from tiny import save_ascii_tokenizer, save_hf_model

    cfg = {**FAMILIES[family].tiny_config(), **overrides}
    d = tmp_path_factory.mktemp(family)
    save_hf_model(cfg, d)
    save_ascii_tokenizer(d, cfg["vocab_size"])
    return d


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return _make(tmp_path_factory, "mixtral")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):  # 4 experts instead of 6: fewer programs to lower
    return _make(tmp_path_factory, "qwen2_moe", num_experts=4)


def _offload(folder, spec: str):
    return PassManager([parse_pass(f"moe.offload:{spec}")]).run(import_hf(folder, max_seq_len=48))


def _moes(ir):
    return [(d, ir.block_at(d).ffn) for d in range(ir.n_layers) if isinstance(ir.block_at(d).ffn, MoE)]


# ---------------------------------------------------------------- the pass


def test_pass_stores_a_valid_predictor(mixtral_dir, tmp_path):
    ir, logs = _offload(mixtral_dir, f"cache_experts=3,{CALIB}")
    moes = _moes(ir)
    assert [d for d, _ in moes] == [0, 1]
    for i, (d, m) in enumerate(moes):
        p = m.offload
        assert p.cache_experts == 3 and p.expert_bits == 4
        assert len(p.frequencies) == 4 and sum(p.frequencies) == pytest.approx(1.0)
        if i + 1 < len(moes):
            assert len(p.transition) == 4 and all(len(r) == 4 for r in p.transition)
            assert all(sum(r) == pytest.approx(1.0) and min(r) >= 0 for r in p.transition)
        else:
            assert p.transition is None
        # experts quantized for XNNPACK's 8da4w, router and backbone float
        assert all(isinstance(ex.down.weight, QuantWeight) and ex.down.weight.act_bits == 8 for ex in m.experts)
        assert isinstance(m.router.weight, Weight) and isinstance(ir.block_at(d).attn.o.weight, Weight)
    info = logs[0].info
    assert info["moe_layers"] == 2 and info["tokens"] == 128 and 0 <= info["predictor_recall"] <= 1
    assert "offload: cache_experts=3 expert_bits=4" in print_model(ir)
    back = load_ir(save_ir(ir, tmp_path / "ir"))  # the plan survives serialization
    assert _moes(back)[0][1].offload.transition == moes[0][1].offload.transition


def test_verify_rejects_a_broken_plan(mixtral_dir):
    from slmc.compiler.verify import problems

    ir, _ = _offload(mixtral_dir, f"expert_bits=0,{CALIB}")
    first, last = _moes(ir)[0][1].offload, _moes(ir)[1][1].offload
    first.transition[0] = [1.0, 1.0, 0.0, 0.0]
    last.transition = [[0.25] * 4] * 4
    found = " ".join(p for _, p in problems(ir))
    assert "summing to 1" in found and "every MoE depth but the last" in found


def test_pass_on_qwen2_moe_skips_the_dense_layer(qwen_dir):
    ir, _ = _offload(qwen_dir, f"backbone_bits=4,group_size=16,{CALIB}")
    moes = _moes(ir)
    assert [d for d, _ in moes] == [0, 2]  # depth 1 is dense (mlp_only_layers)
    first = moes[0][1]
    assert len(first.offload.transition) == 4 and moes[1][1].offload.transition is None
    assert isinstance(first.shared.down.weight, QuantWeight)  # backbone_bits reaches the shared expert
    assert isinstance(first.shared_gate.weight, Weight) and isinstance(first.router.weight, Weight)
    assert isinstance(ir.block_at(1).ffn.down.weight, QuantWeight)


def test_statistics_count_every_routed_pair():
    routes = {0: torch.tensor([[0, 1], [0, 2], [3, 2]]), 4: torch.tensor([[1, 2], [1, 3], [0, 1]])}
    freqs, trans, recall = statistics(routes, {0: 4, 4: 4})
    assert freqs[0] == pytest.approx([2 / 6, 1 / 6, 2 / 6, 1 / 6])
    assert 4 not in trans  # the last MoE depth has no successor
    # expert 0 at depth 0 (tokens 0, 1) is followed by 1, 2 then 1, 3
    assert trans[0][0] == pytest.approx([0, 0.5, 0.25, 0.25])
    assert trans[0][3] == pytest.approx([0.5, 0.5, 0, 0])
    assert trans[0][1] == pytest.approx([0, 0.5, 0.5, 0]) and trans[0][2] == pytest.approx([0.25, 0.5, 0.0, 0.25])
    assert 0 < recall <= 1


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("spec,needle", [
    ("cache_experts=1", "smaller than top_k=2"),
    ("expert_bits=3", "expert_bits=3"),
    ("act_bits=4", "act_bits=4"),
    ("group_size=40", "group size 40"),
])
def test_bad_options_exit_2(mixtral_dir, tmp_path, spec, needle):
    res = _cli(["compile", mixtral_dir, "-o", tmp_path / "out", "--max-seq-len", "32",
                "--pass", f"moe.offload:{spec}"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("slmc: error:") and needle in err, err
    assert "moe.offload" in err and not (tmp_path / "out").exists()


def test_dense_model_exits_2(tiny_llama_dir, tmp_path):
    res = _cli(["compile", tiny_llama_dir, "-o", tmp_path / "out", "--pass", "moe.offload"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "dense" in err and "mixture-of-experts" in err, err


# ---------------------------------------------------------------- the cache policy on its own


def _sweep(cache, routes, transition, predict):
    """Tokens through MoE depths 0..L-1 with the runner's policy: routes[t][l] = experts."""
    for token in routes:
        for layer, experts in enumerate(token):
            serve_layer(cache, layer, experts, lambda e, loaded: None)
            assert len(cache.entries) <= cache.capacity
            nxt = layer + 1 if predict and layer + 1 < len(token) else None
            w = torch.full((len(experts),), 1.0 / len(experts))
            after_layer(cache, layer, nxt, transition, torch.tensor(experts), w, len(experts))
            assert len(cache.entries) <= cache.capacity
    return cache.stats


def test_prediction_beats_lru_when_routing_is_predictable():
    # each token keeps its two experts from depth to depth: P(e' | e) is the identity
    g = torch.Generator().manual_seed(0)
    routes = [[torch.randperm(4, generator=g)[:2].tolist()] * 6 for _ in range(20)]
    eye = torch.eye(4).tolist()
    sizes = []
    lru = _sweep(ExpertCache(2, lambda k: k, lambda k: sizes.append(k) or 100), routes, eye, False)
    pred = _sweep(ExpertCache(2, lambda k: k, lambda k: 100), routes, eye, True)
    assert lru.max_resident <= 2 and pred.max_resident <= 2
    assert lru.hit_rate == 0.0  # a cyclic sweep over 24 experts through 2 slots: LRU's worst case
    assert pred.hit_rate >= 5 / 6 - 1e-9 and pred.preloads_used == pred.hits
    assert lru.bytes_read == 100 * len(sizes)


def test_unused_preloads_are_dropped_after_their_layer():
    # the table always guesses expert 3 next, the token goes to experts 0 and 1
    cache = ExpertCache(8, lambda k: k, lambda k: 1)
    t = [[0.0, 0.0, 0.5, 0.5]] * 4
    serve_layer(cache, 0, [0, 1], lambda e, loaded: None)
    after_layer(cache, 0, 1, t, torch.tensor([0, 1]), torch.tensor([0.5, 0.5]), 2)
    assert {(1, 2), (1, 3)} <= set(cache.entries)
    serve_layer(cache, 1, [0, 2], lambda e, loaded: None)  # (1, 2) was a good guess, (1, 3) not
    after_layer(cache, 1, None, None, torch.tensor([0, 2]), torch.tensor([0.5, 0.5]), 2)
    assert (1, 3) not in cache.entries and (1, 2) in cache.entries
    s = cache.stats
    assert (s.preloads, s.preloads_used, s.preloads_dropped, s.hits, s.misses) == (2, 1, 1, 1, 3)


def test_cache_evicts_least_recently_used():
    loaded = []
    c = ExpertCache(2, lambda k: loaded.append(k) or k, lambda k: 10)
    for k in ["a", "b", "a", "c", "b"]:
        c.get(k)
    assert loaded == ["a", "b", "c", "b"] and list(c.entries) == ["c", "b"]
    assert (c.stats.hits, c.stats.misses, c.stats.evictions, c.stats.bytes_read) == (1, 4, 2, 40)


# ---------------------------------------------------------------- the artifact and its runner


@pytest.fixture(scope="module")
def float_artifact(mixtral_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "mixtral-offload"
    res = _cli(["compile", mixtral_dir, "-o", out, "-b", "portable", "--max-seq-len", "48", "--pass",
                f"moe.offload:expert_bits=0,act_bits=0,cache_experts=2,{CALIB}"])
    assert res.exit_code == 0, res.output
    return out


def test_layout_has_one_file_per_expert(float_artifact):
    from executorch.runtime import Runtime

    m = json.loads((float_artifact / "manifest.json").read_text())
    plan = m["moe_offload"]
    assert m["format"] == "pte-moe" and m["artifact"] == plan["backbone"] == "backbone.pte"
    files = [f for L in plan["layers"] for f in L["experts"]]
    assert len(files) == len(set(files)) == 8
    for L in plan["layers"]:
        for f, size in zip(L["experts"], L["expert_bytes"]):
            assert (float_artifact / f).stat().st_size == size == m["files"][f]
    assert plan["expert_files_bytes"] == sum(m["files"][f] for f in files)
    # each expert file holds its own weights (fp32 gate/up/down) and little else
    per_expert = plan["expert_weight_bytes"] // 8
    assert per_expert <= plan["layers"][0]["expert_bytes"][0] < per_expert * 1.2
    rt = Runtime.get()
    assert rt.load_program(str(float_artifact / files[0])).method_names == {"forward"}
    assert {"embed", "head", "layer_0", "layer_1"} <= rt.load_program(
        str(float_artifact / "backbone.pte")).method_names
    pred = json.loads((float_artifact / plan["predictor"]).read_text())
    assert pred["moe_depths"] == [0, 1] and pred["transitions"][1] is None
    assert plan["policy"]["cache_experts"] == 2


def test_artifact_validates_against_the_reference(float_artifact):
    report = api.validate_artifact(float_artifact, steps=16)
    assert report.passed and report.greedy_equal and report.decode_max_abs < 1e-4, report.to_json()
    assert "moe offload runner" in report.runtime


def _tokens(n, seed=1):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("k", [2, 3, 8])
def test_runner_never_holds_more_than_k(float_artifact, k):
    manifest = json.loads((float_artifact / "manifest.json").read_text())
    s = MoEOffloadSession(float_artifact, manifest, cache_experts=k)
    loads = []
    original = s.cache.load
    s.cache.load = lambda key: (loads.append(len(s.cache.entries)), original(key))[1]
    ids = _tokens(10)
    s.step(ids, 0)
    for i in range(12):
        s.step([i + 3], len(ids) + i)
        assert len(s.cache.entries) <= k
    assert max(loads) < k and s.stats()["max_resident"] <= k  # room was made before every load
    if k == 8:  # everything fits: each expert is read once
        assert s.stats()["misses"] + s.stats()["preloads"] <= 8


def test_prediction_hits_at_least_as_often_as_lru(float_artifact):
    manifest = json.loads((float_artifact / "manifest.json").read_text())
    ids, got = _tokens(8, seed=2), {}
    for predict in (False, True):
        s = MoEOffloadSession(float_artifact, manifest, cache_experts=2, predict=predict)
        logits = s.step(ids, 0)
        for i in range(16):
            logits = s.step([int(logits.argmax())], len(ids) + i)
        got[predict] = s.stats()
    assert got[True]["hit_rate"] >= got[False]["hit_rate"]
    assert got[True]["preloads"] > 0 and got[False]["preloads"] == 0
    size = manifest["moe_offload"]["layers"][0]["expert_bytes"][0]  # float experts: all one size
    for st in got.values():
        assert st["bytes_read"] == (st["misses"] + st["preloads"]) * size
        assert st["bytes_read_per_token"] == st["bytes_read"] / st["tokens"]


@pytest.mark.parametrize("k", [2, 8])
def test_runner_logits_match_reference_for_any_cache_size(float_artifact, mixtral_dir, k):
    manifest = json.loads((float_artifact / "manifest.json").read_text())
    model = api.reference_model(float_artifact, manifest)
    ids = _tokens(12, seed=3)
    want = reference.forward(model, torch.tensor([ids]))[0]
    s = MoEOffloadSession(float_artifact, manifest, cache_experts=k)
    prefix = s.step(ids[:5], 0)
    assert (prefix - want[4]).abs().max() < 1e-4
    for i in range(5, 12):  # then token by token
        got = s.step([ids[i]], i)
        assert (got - want[i]).abs().max() < 1e-4


@pytest.mark.slow  # ~3-6 min: 13 programs lowered through XNNPACK
def test_quantized_experts_on_xnnpack(qwen_dir, tmp_path):
    out, manifest = api.compile_model(qwen_dir, "executorch", "xnnpack", tmp_path / "q", max_seq_len=48,
                                      passes=[f"moe.offload:cache_experts=2,{CALIB}"])
    plan = manifest["moe_offload"]
    assert plan["expert_bits"] == 4 and not plan["quantized_backbone"]
    sizes = [s for L in plan["layers"] for s in L["expert_bytes"]]
    fp32 = 3 * 64 * 32 * 4  # one expert's gate/up/down in float32 (hidden 64, moe_intermediate 32)
    assert len(sizes) == 8 and max(sizes) < fp32 / 2  # int4 codes + bf16 scales, not floats
    assert manifest["quantization"]["schemes"]  # so validation applies the quantized tolerance
    report = api.validate_artifact(out, steps=12)
    assert report.passed and report.decode_max_abs < 0.05, report.to_json()


def test_slmc_run_uses_the_offload_runner(float_artifact):
    """`slmc run` on an expert-offload folder generates with slmc's offload runner: the same
    greedy tokens as the reference of the compiled IR."""
    from tokenizers import Tokenizer

    stats = api.run(float_artifact, api.RunOptions("Hello world", max_new_tokens=12, chat=False))
    tok = Tokenizer.from_file(str(float_artifact / "tokenizer.json"))
    ids = tok.encode("Hello world", add_special_tokens=False).ids
    ref = api.reference_model(float_artifact, json.loads((float_artifact / "manifest.json").read_text()))
    out, _ = reference.greedy(ref, ids, stats["generated_tokens"])
    assert stats["generated_tokens"] > 0 and stats["tokens"] == out
    assert "offload" in stats["runtime"]
