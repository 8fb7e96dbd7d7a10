"""quant.awq:quantize=false hands its data-free samples to the next pass (issue 17: the second
draw cost 1362 s at Qwen2.5-3B); the samples it hands on are samples of the folded model, and a
pass that asks for other samples, or a fold that changed the function, still draws anew."""

import pytest
import torch

import slmc.passes  # noqa: F401  (registers the passes)
from slmc.compiler import calib, reference
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.pass_manager import PassManager, parse_pass

AWQ = "quant.awq:bits=4,group_size=32,quantize=false,n_seqs=2,seq_len=16"


@pytest.fixture
def draws(monkeypatch):
    calls = []
    real = calib._draw

    def counting(*a, **k):
        calls.append(a[1:])
        return real(*a, **k)

    monkeypatch.setattr(calib, "_draw", counting)
    monkeypatch.setattr(calib, "_SAMPLES", {})
    return calls


def _run(model, *specs):
    return PassManager([parse_pass(s) for s in specs]).run(model)


def test_gptq_after_the_fold_draws_no_second_time(tiny_llama_dir, draws):
    m = import_hf(tiny_llama_dir)
    out, logs = _run(m, AWQ, "quant.gptq:bits=4,group_size=32,n_seqs=2,seq_len=16")
    assert len(draws) == 1
    assert logs[0].info["samples_carried"] == 1


def test_control_other_settings_draw_again(tiny_llama_dir, draws):
    m = import_hf(tiny_llama_dir)
    _run(m, AWQ, "quant.gptq:bits=4,group_size=32,n_seqs=2,seq_len=16,seed=1")
    assert len(draws) == 2


def test_control_without_the_carry_the_fold_draws_again(tiny_llama_dir, draws, monkeypatch):
    """The carry is what saves the draw: the folded weights have a fingerprint of their own."""
    monkeypatch.setattr("slmc.passes.quant_awq.carry_samples", lambda ids, model: 0)
    m = import_hf(tiny_llama_dir)
    _run(m, AWQ, "quant.gptq:bits=4,group_size=32,n_seqs=2,seq_len=16")
    assert len(draws) == 2


def test_the_carried_samples_are_the_folded_models_own(tiny_llama_dir, draws):
    """The fold kept the function: the model before and after give the same logits on the
    carried samples, which is what makes them valid for the folded one."""
    m = import_hf(tiny_llama_dir)
    ids = calib.sample_ids(m, 2, 16, 0)
    before = reference.forward(m, ids)
    out, logs = _run(m, AWQ)
    assert logs[0].info["scaled_groups"] > 0  # the fold did change the weights
    after = reference.forward(out, ids)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    assert torch.equal(calib.sample_ids(out, 2, 16, 0), ids) and len(draws) == 1


def test_a_calibrated_fold_carries_nothing(tiny_llama_dir, draws, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    m = import_hf(tiny_llama_dir)
    out, logs = _run(m, f"{AWQ},calib={text}")
    assert "samples_carried" not in logs[0].info and not draws
