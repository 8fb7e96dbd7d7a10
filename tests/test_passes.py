"""The pass manager and the canonical passes: numbers before and after."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slmc.passes  # registers the passes
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


def test_requires_is_checked_on_the_ir(tiny):
    from slmc.compiler.pass_manager import Pass, PassResult

    class NeedsFused(Pass):
        name = "test.needs_fused"
        requires = ("fused_qkv",)

        def run(self, ir):
            return PassResult(ir, False)

    with pytest.raises(SlmcError, match=r"^--pass test.needs_fused: requires .* \(fused_qkv\), but blocks.0.attn "
                                        r"has separate float q/k/v; run canon.fuse_projections before "
                                        r"test.needs_fused$"):
        PassManager([NeedsFused()]).run(tiny)
    PassManager([parse_pass("canon.fuse_projections"), NeedsFused()]).run(tiny)


def test_a_broken_promise_is_an_internal_error(tiny):
    from slmc.compiler.pass_manager import Pass, PassResult

    class Promises(Pass):
        name = "test.promises"
        ensures = ("untied_head",)

        def run(self, ir):
            return PassResult(ir, False)

    with pytest.raises(RuntimeError, match="test.promises broke its promise untied_head"):
        PassManager([Promises()]).run(tiny)
    m, _ = PassManager([parse_pass("canon.untie_embeddings"), Promises()]).run(tiny)
    assert m.lm_head is not None


def test_unknown_property_names_are_refused():
    from slmc.compiler.pass_manager import PASSES, Pass, register

    class Typo(Pass):
        name = "test.typo"
        requires = ("fused_qvk",)

    with pytest.raises(ValueError, match="unknown IR properties fused_qvk"):
        register(Typo)
    with pytest.raises(ValueError, match="unknown IR properties fused_qvk"):
        PassManager([Typo()])
    assert "test.typo" not in PASSES


def test_option_dependent_promises(tiny):
    p = parse_pass("canon.fuse_projections:qkv=false")
    assert p.ensures == ("fused_gate_up",)
    assert parse_pass("quant.rtn:head_bits=8").ensures == ("quantized_linears", "quantized_head")
    assert parse_pass("quant.awq:quantize=false").ensures == ()
    m, _ = PassManager([parse_pass("quant.rtn:bits=8,group_size=16,head_bits=8,embed_bits=8")]).run(tiny)
    from slmc.compiler.properties import PROPERTIES

    for name in ("quantized_linears", "quantized_head", "quantized_embed", "untied_head"):
        assert PROPERTIES[name].violation(m) is None, name
    assert PROPERTIES["float_attention"].violation(m) == "blocks.0.attn has quantized projections"


def test_shared_option_vocabularies_keep_flat_names():
    import dataclasses

    from slmc.passes._options import CalibOptions, QuantOptions

    quant = [f.name for f in dataclasses.fields(QuantOptions)]
    calib = [f.name for f in dataclasses.fields(CalibOptions)]
    for name in ("quant.rtn", "quant.gptq", "quant.awq"):
        fields = [f.name for f in dataclasses.fields(type(parse_pass(name).options))]
        assert set(quant + calib * (name != "quant.rtn")) <= set(fields), name
    o = parse_pass("quant.gptq:bits=8,group_size=0,seq_len=64,act_order=true").options
    assert (o.bits, o.group_size, o.seq_len, o.act_order, o.n_seqs) == (8, 0, 64, True, 16)
    assert parse_pass("arch.share_layers").options.n_seqs == 8  # a pass keeps its own default


PASSES_DIR = Path(slmc.passes.__file__).parent


def test_no_pass_imports_another_pass():
    passes = {p.stem for p in PASSES_DIR.glob("*.py") if not p.stem.startswith("_")}
    for f in PASSES_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                assert not set(names) & passes or f.stem == "__init__", f"{f.name} imports {names}"


def test_the_compiler_does_not_import_the_passes():
    code = "import sys, slmc.compiler.pass_manager, slmc.compiler.properties; print('slmc.passes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(slmc.passes.__file__).parents[2])
    assert out.stdout.strip() == "False"
    upward = re.compile(r"^\s*(from|import)\s+(slmc\.passes|\.\.+passes)\b|import_module\(\S*passes", re.MULTILINE)
    for f in (PASSES_DIR.parent / "compiler").rglob("*.py"):
        assert not upward.search(f.read_text()), f


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
