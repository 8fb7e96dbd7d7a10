"""The pass manager and the canonical passes: numbers before and after."""

import pytest
import torch

from slmc.compiler import reference
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.printer import print_model
from slmc.errors import SlmcError


@pytest.fixture
def tiny(tiny_llama_dir):
    return import_hf(tiny_llama_dir, max_seq_len=32)


def _logits(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return reference.forward(m, torch.randint(0, m.vocab_size, (1, 11), generator=g))


def test_fuse_then_split_preserves_logits(tiny):
    before = _logits(tiny)
    m, logs = PassManager([parse_pass("canon.fuse_projections")]).run(tiny)
    assert logs[0].modified and logs[0].info["fused"] == 4
    assert m.blocks[0].attn.fused and m.blocks[0].ffn.fused
    assert "qkv: f32[128,64]" in print_model(m)
    assert torch.allclose(_logits(m), before, atol=1e-5)
    m, logs = PassManager([parse_pass("canon.split_projections")]).run(m)
    assert logs[0].modified and not m.blocks[0].attn.fused
    assert torch.allclose(_logits(m), before, atol=1e-5)


def test_fuse_options_are_typed(tiny):
    m, logs = PassManager([parse_pass("canon.fuse_projections:qkv=false")]).run(tiny)
    assert not m.blocks[0].attn.fused and m.blocks[0].ffn.fused
    assert logs[0].options == {"qkv": False, "gate_up": True}
    with pytest.raises(SlmcError, match="cannot read 'maybe' as bool"):
        parse_pass("canon.fuse_projections:qkv=maybe")
    with pytest.raises(SlmcError, match="no option 'bogus'"):
        parse_pass("canon.fuse_projections:bogus=1")
    with pytest.raises(SlmcError, match="unknown pass"):
        parse_pass("canon.nope")


def test_untie_then_tie_round_trips(tiny):
    before = _logits(tiny)
    m, logs = PassManager([parse_pass("canon.untie_embeddings"), parse_pass("canon.tie_embeddings")]).run(tiny)
    assert [l.modified for l in logs] == [True, True] and m.lm_head is None
    assert torch.equal(_logits(m), before)


def test_tie_leaves_a_different_head_alone(tiny):
    from slmc.compiler.ir import Linear, Weight

    tiny.lm_head = Linear(Weight(tiny.embed.data.clone() + 1e-3))
    m, logs = PassManager([parse_pass("canon.tie_embeddings")]).run(tiny)
    assert not logs[0].modified and m.lm_head is not None


def test_requires_is_checked():
    from slmc.compiler.pass_manager import PASSES, Pass, register

    @register
    class NeedsFuse(Pass):
        name = "test.needs_fuse"
        requires = ("canon.fuse_projections",)

    try:
        with pytest.raises(SlmcError, match="requires canon.fuse_projections"):
            PassManager([NeedsFuse()])
        PassManager([parse_pass("canon.fuse_projections"), NeedsFuse()])
    finally:
        del PASSES["test.needs_fuse"]


def test_manager_verifies_after_each_pass(tiny):
    from slmc.compiler.pass_manager import Pass, PassResult

    class Breaks(Pass):
        name = "test.breaks"

        def run(self, ir):
            ir.blocks[0].attn.n_kv_heads = 3
            return PassResult(ir, True)

    with pytest.raises(SlmcError, match="after pass test.breaks"):
        PassManager([Breaks()]).run(tiny)


def test_dump_ir_writes_one_file_per_pass(tiny, tmp_path):
    PassManager([parse_pass("canon.untie_embeddings"), parse_pass("canon.fuse_projections")],
                dump_dir=tmp_path).run(tiny)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-input.txt", "01-canon.untie_embeddings.txt", "02-canon.fuse_projections.txt"]
    assert "tied to embed" in (tmp_path / "00-input.txt").read_text()
    assert "qkv:" in (tmp_path / "02-canon.fuse_projections.txt").read_text()
