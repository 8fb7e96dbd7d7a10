"""quant.gptq's clip_steps (a finer clip search over the same span of ratios): its default is the
old grid exactly, a finer grid never raises a group's Hessian-weighted rounding error, and the pass
takes it. (refine and float_target, measured in bench/results/quant_calib.md's method rows at
commit 26b4d17, gained nothing and were removed.)"""

import pytest
import torch

import slmc.passes  # noqa: F401  (registers the passes)
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import QuantWeight
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.quant import QuantScheme
from slmc.errors import SlmcError
from slmc.passes.quant_gptq import _blocks, clipped_params, gptq


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


def test_default_clip_steps_is_the_old_grid():
    """The ratios 1 - i / 20, i < 10, written out: the default must not move existing results."""
    X, W = _layer(4)
    H = 2 * X.T @ X / X.shape[0]
    s = QuantScheme(4, 32, True)
    Hb = _blocks(H, 32)
    Wg = W.view(W.shape[0], -1, 32)
    hi = Wg.abs().amax(-1, keepdim=True)
    best = None
    for i in range(10):
        r = 1 - i / 20
        sc = (torch.clamp(Wg, -hi * r, hi * r).abs().amax(-1) / s.qmax).clamp_min(1e-12)
        q = torch.clamp(torch.round(W / sc.repeat_interleave(32, 1)), s.qmin, s.qmax)
        E = (q * sc.repeat_interleave(32, 1) - W).view(W.shape[0], -1, 32).transpose(0, 1)
        err = (torch.bmm(E, Hb) * E).sum(-1).T
        best = (err, sc) if best is None else (torch.minimum(best[0], err), torch.where(err < best[0], sc, best[1]))
    assert torch.equal(clipped_params(W, Hb, s)[0], best[1])
    a, b = gptq(W, H, s, act_order=True, clip=True), gptq(W, H, s, act_order=True, clip=True, clip_steps=10)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))


def test_pass_option(tiny_llama_dir):
    cal = "group_size=16,n_seqs=8,seq_len=64,seed=0"
    out = {}
    for extra in ("", ",clip_steps=20"):
        q, logs = PassManager([parse_pass(f"quant.gptq:{cal}{extra}")]).run(import_hf(tiny_llama_dir))
        assert logs[0].info["quantized"] == 14
        assert all(isinstance(q.block_at(d).attn.q.weight, QuantWeight) for d in range(q.n_layers))
        out[extra] = torch.cat([q.blocks[b].ffn.down.weight.scales.flatten() for b in range(len(q.blocks))])
    assert not torch.equal(out[""], out[",clip_steps=20"])
    with pytest.raises(SlmcError, match="clip_steps"):
        PassManager([parse_pass(f"quant.gptq:{cal},clip_steps=0")]).run(import_hf(tiny_llama_dir))
