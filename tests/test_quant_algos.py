"""quant.gptq and quant.awq: better than RTN, AWQ's folding is exact, GPTQ's act-order keeps
contiguous groups, calibration is deterministic, bad calibration text is refused."""

import pytest
import torch
from click.testing import CliRunner
from tiny import save_ascii_tokenizer, save_hf_model

from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.calib import calibration_ids
from slmc.compiler.families import FAMILIES, load_all
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import MoE, QuantWeight, Weight
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.quant import QuantScheme, group_params, rtn
from slmc.passes.quant_awq import QuantAWQ
from slmc.passes.quant_gptq import gptq

CAL = "n_seqs=8,seq_len=64,seed=0"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _tiny(tmp_path_factory, family: str, **overrides):
    load_all()
    d = tmp_path_factory.mktemp(family)
    save_hf_model({**FAMILIES[family].tiny_config(), **overrides}, d)
    save_ascii_tokenizer(d)
    return d


def _quantize(folder, *specs):
    return PassManager([parse_pass(s) for s in specs]).run(import_hf(folder))


def test_gptq_and_awq_beat_rtn(tiny_llama_dir):
    m = import_hf(tiny_llama_dir)
    held_out = calibration_ids(m, [], 8, 64, seed=123)  # same distribution as calibration, other samples
    ref = reference.forward(m, held_out)
    mse = {}
    for spec in ("quant.rtn:group_size=16", f"quant.gptq:group_size=16,{CAL}", f"quant.awq:group_size=16,{CAL}"):
        q, logs = _quantize(tiny_llama_dir, spec)
        assert logs[0].info["quantized"] == 14
        assert all(isinstance(q.block_at(d).attn.q.weight, QuantWeight) for d in range(q.n_layers))
        mse[spec.split(":")[0]] = float(((reference.forward(q, held_out) - ref) ** 2).mean())
    assert mse["quant.gptq"] < 0.8 * mse["quant.rtn"], mse
    assert mse["quant.awq"] < 0.9 * mse["quant.rtn"], mse
    assert q.blocks[0].attn.q.weight.algorithm == "awq"
    # AWQ's scales alone (quantize=false), then GPTQ on the rescaled float model
    q, logs = _quantize(tiny_llama_dir, f"quant.awq:group_size=16,quantize=false,{CAL}",
                        f"quant.gptq:group_size=16,{CAL}")
    assert logs[0].info["quantized"] == 0 and logs[0].info["scaled_groups"] > 0 and logs[1].info["quantized"] == 14
    assert q.blocks[0].attn.q.weight.algorithm == "gptq"
    both = float(((reference.forward(q, held_out) - ref) ** 2).mean())
    assert both < 0.8 * mse["quant.rtn"], (both, mse)


@pytest.mark.parametrize("family,overrides,fuse,groups", [
    ("llama", {"num_key_value_heads": 4}, False, 8),  # n_heads == n_kv_heads: o folds into v
    ("llama", {"num_key_value_heads": 4}, True, 8),  # fused qkv / gate_up rows
    ("gemma2", {}, False, 9),  # unit-offset norms, sandwich norms; o skipped (4 heads, 2 KV)
    ("qwen2_moe", {}, False, 21),  # router, experts, shared expert and its gate
])
def test_awq_folding_alone_preserves_logits(tmp_path_factory, family, overrides, fuse, groups):
    d = _tiny(tmp_path_factory, family, **overrides)
    m = import_hf(d)
    if fuse:
        m, _ = PassManager([parse_pass("canon.fuse_projections")]).run(m)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    ref = reference.forward(m, ids)
    norm_before = m.blocks[0].attn_norm.weight.float().clone()
    res = QuantAWQ(parse_pass(f"quant.awq:group_size=16,{CAL}").options).apply(m, quantize=False)
    assert res.info["scaled_groups"] == groups and res.info["quantized"] == 0
    assert not torch.allclose(m.blocks[0].attn_norm.weight.float(), norm_before)  # really rescaled
    assert not any(isinstance(w, QuantWeight) for w in (m.blocks[0].attn.o.weight, m.embed))
    err = float((reference.forward(m, ids) - ref).abs().max())
    assert err <= 1e-5, err


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_act_order_gives_contiguous_groups(tiny_llama_dir, sym):
    orig = import_hf(tiny_llama_dir)
    q, _ = _quantize(tiny_llama_dir, f"quant.gptq:group_size=16,symmetric={sym},act_order=true,clip=false,{CAL}")
    s = QuantScheme(4, 16, sym)
    for b0, b1 in zip(orig.blocks, q.blocks):
        for w0, w1 in ((b0.attn.q.weight, b1.attn.q.weight), (b0.ffn.down.weight, b1.ffn.down.weight)):
            assert isinstance(w1, QuantWeight) and w1.algorithm == "gptq" and w1.group_size == 16
            assert w1.codes.dtype == (torch.int8 if sym else torch.uint8) and w1.shape == w0.shape
            assert s.qmin <= int(w1.codes.min()) and int(w1.codes.max()) <= s.qmax
            assert w1.scales.shape == (w0.shape[0], w0.shape[1] // 16) and (w1.zeros is None) == sym
            scales, zeros = group_params(w0.float(), s)  # static groups: the original contiguous groups
            assert torch.equal(w1.scales, scales)
            if not sym:
                assert torch.equal(w1.zeros, zeros)
            assert not torch.equal(w1.codes, rtn(w0.float(), s).codes)  # error feedback moved codes


def test_gptq_with_identity_hessian_is_rtn():
    w = torch.randn(24, 64)
    s = QuantScheme(4, 16, True)
    codes, scales, zeros = gptq(w, torch.eye(64), s, damp=0.0)
    r = rtn(w, s)
    assert torch.equal(codes, r.codes) and torch.allclose(scales, r.scales) and zeros is None


def test_moe_family_gptq_and_awq_run_and_verify(tmp_path_factory):
    d = _tiny(tmp_path_factory, "qwen2_moe")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    for spec in (f"quant.gptq:group_size=16,{CAL}", f"quant.awq:group_size=16,{CAL}"):
        q, _ = _quantize(d, spec)  # the pass manager verifies the IR after the pass
        moe = next(b.ffn for b in q.blocks if isinstance(b.ffn, MoE))
        assert all(isinstance(e.down.weight, QuantWeight) for e in moe.experts)
        assert isinstance(moe.shared.up.weight, QuantWeight) and isinstance(moe.router.weight, Weight)
        assert bool(reference.forward(q, ids).isfinite().all())


def test_calibration_is_deterministic(tiny_llama_dir, tmp_path):
    m = import_hf(tiny_llama_dir)
    a, b = calibration_ids(m, [], 4, 16, seed=5), calibration_ids(m, [], 4, 16, seed=5)
    assert a.shape == (4, 16) and torch.equal(a, b) and int(a.max()) < m.vocab_size
    assert not torch.equal(a, calibration_ids(m, [], 4, 16, seed=6))
    text = tmp_path / "c.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    t1, t2 = (calibration_ids(m, [str(text)], 4, 64, seed=1) for _ in range(2))
    assert t1.shape == (4, 64) and torch.equal(t1, t2)


@pytest.mark.parametrize("content,message", [(b"", "empty"), (b"\x00\x01\x02binary", "binary"),
                                             (b"far too short", "too short")])
def test_bad_calibration_text_exits_2(tiny_llama_dir, tmp_path, content, message):
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    for algo in ("gptq", "awq"):
        res = CliRunner().invoke(main, ["inspect", str(tiny_llama_dir), "--pass", f"quant.{algo}:calib={f}"])
        assert res.exit_code == 2 and message in res.output and "calib.txt" in res.output, res.output


def test_shared_block_is_quantized_once(tiny_llama_dir):
    for algo in ("gptq", "awq"):
        m = import_hf(tiny_llama_dir)
        m.blocks, m.layers = m.blocks[:1], [0, 0]  # one block at both depths
        q, logs = PassManager([parse_pass(f"quant.{algo}:group_size=16,{CAL}")]).run(m)
        assert logs[0].info["quantized"] == 7 and q.block_at(0) is q.block_at(1)
        assert isinstance(q.blocks[0].ffn.down.weight, QuantWeight)
