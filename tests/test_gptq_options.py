"""quant.gptq's options refine (least-squares scales, then GPTQ again), float_target (GPTAQ's
asymmetric calibration) and clip_steps (a finer clip search): each lowers the error it targets
on a small random layer, and the pass runs them on a model."""

import pytest
import torch

import slmc.passes  # noqa: F401  (registers the passes)
from slmc.compiler import reference
from slmc.compiler.calib import calibration_ids
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import QuantWeight
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.quant import QuantScheme
from slmc.errors import SlmcError
from slmc.passes.quant_gptq import _blocks, clipped_params, cross, float_target, gptq


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _layer(seed=0, n=600, cols=128, rows=48):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3 + torch.randn(n, cols, generator=g)
    return X, torch.randn(rows, cols, generator=g)


def _deq(codes, scales, zeros, g):
    z = zeros.repeat_interleave(g, 1) if zeros is not None else 0.0
    return (codes.float() - z) * scales.repeat_interleave(g, 1)


def _err(W, H, q):
    D = _deq(*q, 32) - W
    return ((D @ H) * D).sum(-1)


@pytest.mark.parametrize("symmetric,act_order", [(True, True), (True, False), (False, True)])
def test_refine_lowers_the_hessian_weighted_error(symmetric, act_order):
    X, W = _layer()
    H = 2 * X.T @ X / X.shape[0]
    s = QuantScheme(4, 32, symmetric)
    plain = gptq(W, H, s, act_order=act_order, clip=True)
    assert all(torch.equal(a, b) for a, b in zip(plain[:2], gptq(W, H, s, act_order=act_order, clip=True,
                                                                   refine=0)[:2]))  # off: the old path
    ref = gptq(W, H, s, act_order=act_order, clip=True, refine=2)
    e0, e1 = _err(W, H, plain), _err(W, H, ref)
    assert (e1 <= e0 + 1e-4 * e0).all()  # never worse on any row
    assert e1.sum() < 0.97 * e0.sum(), (float(e1.sum()), float(e0.sum()))
    assert ref[0].dtype == plain[0].dtype and ref[1].shape == plain[1].shape
    assert int(ref[0].min()) >= s.qmin and int(ref[0].max()) <= s.qmax


def test_float_target_lowers_the_error_against_the_float_output():
    Xf, W = _layer(1)
    Xq = Xf + 0.3 * torch.randn(Xf.shape, generator=torch.Generator().manual_seed(2))  # drifted inputs
    H = 2 * Xq.T @ Xq / Xq.shape[0]
    s = QuantScheme(4, 32, True)
    Y = Xf @ W.T  # the float model's output

    def out_err(Wq):
        return float(((Y - Xq @ Wq.T) ** 2).sum())

    plain = _deq(*gptq(W, H, s, act_order=True, clip=True), 32)
    Wt = float_target(W, H, 2 * cross(Xq, Xf), 0.01)
    asym = _deq(*gptq(Wt, H, s, act_order=True, clip=True), 32)
    assert out_err(asym) < 0.9 * out_err(plain), (out_err(asym), out_err(plain))
    # equal inputs: the target is W itself
    H0 = 2 * Xf.T @ Xf / Xf.shape[0]
    assert torch.allclose(float_target(W, H0, 2 * cross(Xf, Xf), 0.01), W, atol=1e-4)


def test_clip_steps_finer_grid_never_worse():
    X, W = _layer(3)
    H = 2 * X.T @ X / X.shape[0]
    s, Hb = QuantScheme(4, 32, True), _blocks(H, 32)

    def group_err(sc):  # each group's RTN error under its Hessian block
        q = torch.clamp(torch.round(W / sc.repeat_interleave(32, 1)), s.qmin, s.qmax)
        E = (q * sc.repeat_interleave(32, 1) - W).view(W.shape[0], -1, 32).transpose(0, 1)
        return (torch.bmm(E, Hb) * E).sum(-1).T

    coarse, _ = clipped_params(W, Hb, s)
    assert torch.equal(coarse, clipped_params(W, Hb, s, 10)[0])  # the default: the old ratios
    fine, _ = clipped_params(W, Hb, s, 20)  # its ratios include every coarse one
    e0, e1 = group_err(coarse), group_err(fine)
    assert (e1 <= e0 * (1 + 1e-5)).all() and e1.sum() < e0.sum()


def test_pass_options(tiny_llama_dir):
    cal = "group_size=16,n_seqs=8,seq_len=64,seed=0"
    m = import_hf(tiny_llama_dir)
    held = calibration_ids(m, [], 8, 64, seed=123)
    ref = reference.forward(m, held)
    out = {}
    for extra in ("", ",refine=1", ",float_target=true", ",clip_steps=20"):
        q, logs = PassManager([parse_pass(f"quant.gptq:{cal}{extra}")]).run(import_hf(tiny_llama_dir))
        assert logs[0].info["quantized"] == 14
        assert all(isinstance(q.block_at(d).attn.q.weight, QuantWeight) for d in range(q.n_layers))
        out[extra] = q.blocks[1].ffn.down.weight.codes
        mse = float(((reference.forward(q, held) - ref) ** 2).mean())
        assert mse < float((ref ** 2).mean()), extra
    assert all(not torch.equal(out[""], out[k]) for k in out if k)
    for bad in ("refine=-1", "clip_steps=0"):
        with pytest.raises(SlmcError, match=bad.split("=")[0]):
            PassManager([parse_pass(f"quant.gptq:{cal},{bad}")]).run(import_hf(tiny_llama_dir))
