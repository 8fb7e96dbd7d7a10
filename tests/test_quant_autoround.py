"""quant.autoround: its start is RTN exactly, its codes are ordinary groupwise QuantWeights, the
learned rounding lowers the block output error below RTN's on the calibration tokens it learned
from (and the model's error on other samples), shared blocks are learned once, MoE runs, and bad
options are refused in one line."""

import pytest
import torch
from tiny import save_ascii_tokenizer, save_hf_model

from slmc.compiler import reference
from slmc.compiler.calib import calibration_ids
from slmc.compiler.families import FAMILIES, load_all
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import QuantWeight, block_linears
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.quant import QuantScheme, rtn
from slmc.errors import SlmcError
from slmc.passes.quant_autoround import Learned

CAL = "n_seqs=8,seq_len=64,seed=0"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _run(model, spec):
    return PassManager([parse_pass(spec)]).run(model)


@pytest.mark.parametrize("sym,scale_dtype,group", [(True, "float32", 16), (False, "float32", 16),
                                                   (True, "bfloat16", 16), (True, "float32", 0)])
def test_start_is_rtn(sym, scale_dtype, group):
    w = torch.randn(24, 64) * 0.3
    s = QuantScheme(4, group, sym, scale_dtype)
    got, want = Learned(w, s, True).quant_weight(), rtn(w, s)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert (got.zeros is None) == sym and (sym or torch.equal(got.zeros, want.zeros))
    assert got.group_size == want.group_size and got.codes.dtype == want.codes.dtype


def test_learned_codes_beat_rtn(tiny_llama_dir):
    m = import_hf(tiny_llama_dir)
    ids = calibration_ids(m, [], 8, 64, seed=0)  # the pass's own calibration tokens
    held_out = calibration_ids(m, [], 8, 64, seed=123)
    x = reference.embed(m, ids)
    pos = torch.arange(ids.shape[1])
    y, ref = reference.block(m.blocks[0], x, pos), reference.forward(m, held_out)
    err = {}
    for spec in ("quant.rtn:group_size=16", f"quant.autoround:group_size=16,iters=50,{CAL}"):
        q, logs = _run(import_hf(tiny_llama_dir), spec)
        err[spec.split(":")[0]] = (float(((reference.block(q.blocks[0], x, pos) - y) ** 2).mean()),
                                   float(((reference.forward(q, held_out) - ref) ** 2).mean()))
    info = logs[0].info
    assert info["quantized"] == 14 and info["block_loss_vs_rtn"] < 1 and info["blocks_kept_rtn"] == 0, info
    for _, lin in block_linears(q):
        w = lin.weight
        assert isinstance(w, QuantWeight) and w.algorithm == "autoround" and w.zeros is None
        assert w.codes.dtype == torch.int8 and int(w.codes.min()) >= -8 and int(w.codes.max()) <= 7
        assert w.scales.shape == (w.shape[0], w.shape[1] // 16) and bool((w.scales > 0).all())
    # the first block's input is the embedding in both: its output error on the calibration tokens
    assert err["quant.autoround"][0] < 0.8 * err["quant.rtn"][0], err
    assert err["quant.autoround"][1] < 0.9 * err["quant.rtn"][1], err


def test_asymmetric_bf16_scales(tiny_llama_dir):
    q, logs = _run(import_hf(tiny_llama_dir),
                   f"quant.autoround:group_size=16,symmetric=false,scale_dtype=bfloat16,iters=10,{CAL}")
    assert logs[0].info["quantized"] == 14
    w = q.blocks[1].ffn.down.weight
    assert w.codes.dtype == torch.uint8 and int(w.codes.max()) <= 15 and w.zeros is not None
    assert torch.equal(w.scales, w.scales.bfloat16().float())  # exact in XNNPACK's bf16 storage


def test_shared_block_learned_once(tiny_llama_dir):
    for float_input in ("true", "false"):
        m = import_hf(tiny_llama_dir)
        m.blocks, m.layers = m.blocks[:1], [0, 0]  # one block at both depths
        q, logs = _run(m, f"quant.autoround:group_size=16,iters=5,float_input={float_input},{CAL}")
        assert logs[0].info["quantized"] == 7 and q.block_at(0) is q.block_at(1)
        assert all(isinstance(lin.weight, QuantWeight) for _, lin in block_linears(q))


def test_moe_runs(tmp_path_factory):
    load_all()
    d = tmp_path_factory.mktemp("qwen2_moe")
    save_hf_model(FAMILIES["qwen2_moe"].tiny_config(), d)
    save_ascii_tokenizer(d)
    q, logs = _run(import_hf(d), f"quant.autoround:group_size=16,iters=3,{CAL}")
    assert logs[0].info["quantized"] > 0
    assert all(isinstance(lin.weight, QuantWeight) for _, lin in block_linears(q))
    assert not isinstance(q.blocks[0].ffn.router.weight, QuantWeight)


@pytest.mark.parametrize("opt", ["iters=0", "batch=0", "lr=-1", "min_scale=0", "min_scale=1.5"])
def test_bad_options_refused(tiny_llama_dir, opt):
    with pytest.raises(SlmcError, match="need iters >= 1") as e:
        _run(import_hf(tiny_llama_dir), f"quant.autoround:{opt},{CAL}")
    assert "\n" not in str(e.value)
