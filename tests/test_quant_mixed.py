"""quant.mixed: the size budget holds, the most sensitive linear is the one kept at 8 bits on a
constructed case (and the Fisher estimate ranks like the measured loss), the manifest shows
the mixed schemes, and targets that cannot hold the mix refuse it with their reason."""

import copy

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from slmc.api import compile_model, validate_artifact
from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import QuantWeight, Weight, block_linears
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.quant import QuantScheme, rtn
from slmc.passes.quant_mixed import choose, scheme_bytes

LOW = QuantScheme(4, 32, True)
HIGH = QuantScheme(8, 0, True)
CAL = "n_seqs=4,seq_len=32"


def _run(m, *specs):
    return PassManager([parse_pass(s) for s in specs]).run(m)


def _high(m):
    return {p for p, lin in block_linears(m) if isinstance(lin.weight, QuantWeight) and lin.weight.bits == 8}


def _loss(m, ids):
    logits = reference.forward(m, ids)
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_budget_is_respected_and_counted(tiny_llama_dir):
    m = import_hf(tiny_llama_dir)
    lins = {p: lin.weight.shape for p, lin in block_linears(m)}
    uniform = sum(scheme_bytes(s, LOW) for s in lins.values())
    m, logs = _run(m, f"quant.mixed:budget=0.25,{CAL}")
    info = logs[0].info
    high = _high(m)
    extra = sum(scheme_bytes(lins[p], HIGH) - scheme_bytes(lins[p], LOW) for p in high)
    assert high and set(info["high"]) == high
    assert info["uniform_bytes"] == uniform and extra == info["extra_bytes"] <= 0.25 * uniform
    # every other linear is still float: the next pass rounds them at the low scheme
    assert all(isinstance(lin.weight, Weight) for p, lin in block_linears(m) if p not in high)
    # control: no budget keeps nothing high, a larger one keeps more
    assert not _high(_run(import_hf(tiny_llama_dir), f"quant.mixed:budget=0,{CAL}")[0])
    assert len(_high(_run(import_hf(tiny_llama_dir), f"quant.mixed:budget=1,{CAL}")[0])) > len(high)


def test_then_a_quant_pass_rounds_the_rest(tiny_llama_dir):
    m, _ = _run(import_hf(tiny_llama_dir), f"quant.mixed:budget=0.25,{CAL}", "quant.rtn:bits=4,group_size=32")
    bits = {lin.weight.bits for _, lin in block_linears(m)}
    assert bits == {4, 8}


def test_choose_is_a_greedy_knapsack():
    sens = {1: 10.0, 2: 9.0, 3: 1.0, 4: -1.0}
    cost = {1: 100, 2: 10, 3: 10, 4: 1}
    assert choose(sens, cost, 20) == [2, 3]  # 1 is the most sensitive but does not fit
    assert choose(sens, cost, 120) == [2, 1, 3]  # per byte: 0.9, 0.1, 0.1
    assert choose(sens, cost, 0) == []  # and a linear that rounding does not hurt is never chosen


def test_the_most_sensitive_linear_is_kept_high(tiny_llama_dir):
    """blocks.1.ffn.down made loud (x10, so it dominates the residual stream) with an outlier
    input column (x30, so int4 rounding wipes out the rest of each row's first group), and
    confident logits (embedding x4): it must be the linear kept at 8 bits when only one fits."""
    m = import_hf(tiny_llama_dir)
    m.embed = Weight(m.embed.float() * 4.0)
    target = next(lin for p, lin in block_linears(m) if p == "blocks.1.ffn.down")
    W = target.weight.float() * 10.0
    W[:, 0] *= 30.0
    target.weight = Weight(W)
    cal = "n_seqs=8,seq_len=64"
    ids = parse_pass(f"quant.mixed:{cal}").options.tokens(m)[0]  # the pass's own calibration tokens
    # the measured loss agrees: rounding down alone costs more than rounding any other linear alone
    base, cost = _loss(m, ids), {}
    for p, lin in block_linears(m):
        alone = copy.deepcopy(m)
        lone = next(x for q, x in block_linears(alone) if q == p)
        lone.weight = rtn(lone.weight.float(), LOW)
        cost[p] = _loss(alone, ids) - base
    assert max(cost, key=cost.get) == "blocks.1.ffn.down", cost
    uniform = sum(scheme_bytes(lin.weight.shape, LOW) for _, lin in block_linears(m))
    one = (scheme_bytes(W.shape, HIGH) - scheme_bytes(W.shape, LOW)) / uniform
    assert cost["blocks.1.ffn.down"] > 2 * sorted(cost.values())[-2]
    out, logs = _run(m, f"quant.mixed:budget={one * 1.001:.6f},{cal}")  # down alone fits
    assert _high(out) == {"blocks.1.ffn.down"}, (logs[0].info["most_sensitive"], cost)
    assert logs[0].info["most_sensitive"][0][0] == "blocks.1.ffn.down"


def test_the_manifest_summary_counts_both_schemes(tiny_llama_dir):
    from slmc._api.compile import quant_summary  # what compile writes as manifest["quantization"]

    m, logs = _run(import_hf(tiny_llama_dir), f"quant.mixed:budget=0.3,{CAL}", "quant.rtn:bits=4,group_size=32")
    schemes = quant_summary(m)["schemes"]
    n_high = len(logs[0].info["high"])
    assert n_high and sum(v for k, v in schemes.items() if k.startswith("sint8")) == n_high
    assert schemes["sint4g32"] == sum(1 for _ in block_linears(m)) - n_high


@pytest.mark.slow  # a real ExecuTorch compile and validation (minutes on a loaded 2-core host)
def test_manifest_shows_the_mix_and_xnnpack_runs_it(tiny_llama_dir, tmp_path):
    xnn = "scale_dtype=bfloat16,act_bits=8,symmetric=true"
    out, manifest = compile_model(tiny_llama_dir, "executorch", "xnnpack", tmp_path / "pte", max_seq_len=64,
                                  passes=[f"quant.mixed:budget=0.3,{CAL}",
                                          f"quant.rtn:bits=4,group_size=32,{xnn}"])
    schemes = manifest["quantization"]["schemes"]
    assert any(k.startswith("sint8") for k in schemes) and "sint4g32+act_int8" in schemes
    mixed = next(p for p in manifest["pipeline"] if p["name"] == "quant.mixed")
    assert mixed["info"]["high"] and mixed["options"]["budget"] == 0.3
    report = validate_artifact(out, steps=8)
    assert report.passed, report.to_json()


@pytest.mark.parametrize("args,words", [
    # XNNPACK holds 8-bit codes per channel only
    (["-t", "executorch", "--pass", f"quant.mixed:budget=0.5,high_group_size=32,{CAL}",
      "--pass", "quant.rtn:scale_dtype=bfloat16,act_bits=8"], "per channel only"),
    # ONNX holds the mix (MatMulNBits per block) but not int8 dynamic activations
    (["-t", "onnx", "--pass", f"quant.mixed:budget=0.5,{CAL}", "--pass", "quant.rtn:act_bits=8"], "act_bits=0"),
    # the low and high schemes must differ in size
    (["-t", "tflite", "--pass", f"quant.mixed:high_bits=4,high_group_size=32,{CAL}"], "not larger"),
])
def test_a_mix_the_target_cannot_hold_is_refused(tiny_llama_dir, tmp_path, args, words):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-o", str(out), "--max-seq-len", "32", *args])
    assert r.exit_code == 2, r.output
    assert words in r.output
    assert not out.exists()
