"""The IR itself: verification, printing and exact save/load."""

import torch

from slmc.compiler import reference
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import QuantWeight, named_weights
from slmc.compiler.printer import print_model
from slmc.compiler.serialize import load_ir, save_ir
from slmc.compiler.verify import CHECKS, problems, verify


def _quantize_one(model):
    """Replace one projection by a symmetric int4 g16 QuantWeight (for round-trip tests)."""
    lin = model.blocks[0].ffn.down
    w = lin.weight.float()
    g = 16
    s = w.abs().view(w.shape[0], -1, g).amax(-1) / 7
    codes = torch.clamp(torch.round(w / s.repeat_interleave(g, 1)), -8, 7).to(torch.int8)
    lin.weight = QuantWeight(codes, s, None, g, 4, True, "rtn")
    return lin.weight


def test_save_load_roundtrip_is_exact(tiny_llama_dir, tmp_path):
    m = import_hf(tiny_llama_dir, max_seq_len=32)
    q = _quantize_one(m)
    m.layers = [0, 1, 0]  # block 0 shared by depths 0 and 2
    verify(m)
    save_ir(m, tmp_path / "ir")
    m2 = load_ir(tmp_path / "ir")
    assert print_model(m2) == print_model(m)
    a, b = dict(named_weights(m)), dict(named_weights(m2))
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], QuantWeight):
            assert torch.equal(a[k].codes, b[k].codes) and torch.equal(a[k].scales, b[k].scales)
            assert b[k].bits == 4 and b[k].group_size == 16 and b[k].symmetric
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k].data, b[k].data)
    assert m2.layers == [0, 1, 0]
    assert isinstance(m2.blocks[0].ffn.down.weight, QuantWeight) and q.algorithm == "rtn"
    ids = torch.randint(0, 256, (1, 9))
    assert torch.equal(reference.forward(m, ids), reference.forward(m2, ids))


def test_shared_block_changes_logits_and_prints_once(tiny_llama_dir):
    m = import_hf(tiny_llama_dir, max_seq_len=32)
    ids = torch.randint(0, 256, (1, 7))
    base = reference.forward(m, ids)
    m.layers = [0, 0]
    m.blocks = m.blocks[:1]
    verify(m)
    assert not torch.allclose(base, reference.forward(m, ids))
    text = print_model(m)
    assert "block 0 (depth 0,1)" in text and "block 1" not in text


def test_printer_is_stable(tiny_llama_dir):
    a = print_model(import_hf(tiny_llama_dir, max_seq_len=32))
    b = print_model(import_hf(tiny_llama_dir, max_seq_len=32))
    assert a == b
    assert "heads=4 kv_heads=2 head_dim=16" in a and "lm_head: tied to embed" in a
    assert "kv_cache: max_len=32 layout=bhsd dtype=float32" in a


def test_verify_reports_every_problem_with_its_place(tiny_llama_dir):
    m = import_hf(tiny_llama_dir, max_seq_len=32)
    assert problems(m) == []
    m.blocks[0].attn.n_kv_heads = 3  # 4 heads are not a multiple of 3
    m.layers.append(7)  # a depth pointing at no block
    m.kv.max_len = 10_000  # beyond the model's limit
    found = dict(problems(m))
    assert "blocks.0.attn" in found and "layers.2" in found and "kv.max_len" in found
    assert {c.name for c in CHECKS} >= {"layers", "attention", "ffn", "kv_cache", "quant"}


def test_verify_rejects_nan_scales(tiny_llama_dir):
    m = import_hf(tiny_llama_dir, max_seq_len=32)
    q = _quantize_one(m)
    q.scales[0, 0] = float("nan")
    assert any("NaN" in p for _, p in problems(m))
