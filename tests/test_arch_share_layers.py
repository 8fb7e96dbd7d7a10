"""arch.share_layers: lossless detection, lossy pair selection, IR round trips, bad input,
and per-target artifacts that store shared weights once (size shrinks, artifact validates)."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from slmc import api
from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import named_weights, weight_bytes
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.printer import print_model
from slmc.compiler.serialize import load_ir, save_ir
from slmc.errors import SlmcError
from slmc.passes.arch_share_layers import select

LAYERS = 5


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny random Llama with 5 layers, wide enough that weights dominate artifact sizes,
    an ASCII tokenizer and a calibration text."""
    from tiny import save_ascii_tokenizer, save_hf_model

    from slmc.compiler.families.llama import tiny_config

    d = tmp_path_factory.mktemp("share") / "tiny5"
    cfg = tiny_config()
    cfg.update(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256)
    save_hf_model(cfg, d)
    save_ascii_tokenizer(d)
    (d.parent / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return d


@pytest.fixture
def tiny(src):
    return import_hf(src, max_seq_len=64)


def _run(m, spec):
    return PassManager([parse_pass(spec)]).run(m)


def _logits(m):
    g = torch.Generator().manual_seed(0)
    return reference.forward(m, torch.randint(0, m.vocab_size, (2, 13), generator=g))


def _bytes(obj):
    return sum(w.nbytes() for _, w in named_weights(obj))


def _near_copy(m, i, j, ffn_only=False, eps=0.01):
    """Make block j (or its FFN) block i's plus a little noise: the one near-identical pair."""
    g = torch.Generator().manual_seed(1)
    part = copy.deepcopy(m.blocks[i].ffn if ffn_only else m.blocks[i])
    for _, w in named_weights(part):
        w._data = w.data + eps * torch.randn(w.shape, generator=g)
    if ffn_only:
        m.blocks[j].ffn = part
    else:
        m.blocks[j] = part


# ---------------------------------------------------------------- lossless

def test_lossless_collapses_identical_blocks_and_ffns_exactly(tiny):
    tiny.blocks[3] = copy.deepcopy(tiny.blocks[0])
    tiny.blocks[4].ffn = copy.deepcopy(tiny.blocks[1].ffn)
    before, block_b, ffn_b = _logits(tiny), _bytes(tiny.blocks[0]), _bytes(tiny.blocks[1].ffn)
    m, logs = _run(tiny, "arch.share_layers")
    assert logs[0].modified and torch.equal(_logits(m), before)
    assert len(m.blocks) == LAYERS - 1 and m.layers == [0, 1, 2, 0, 3]
    assert m.blocks[3].ffn is m.blocks[1].ffn
    info = logs[0].info
    assert info["pairs"] == 2 and info["weight_bytes_saved"] == block_b + ffn_b
    assert {(s["kind"], tuple(s["depths"])) for s in info["shared"]} == {("block", (0, 3)), ("ffn", (1, 4))}
    assert "ffn: shared with blocks.1.ffn" in print_model(m) and "block 0 (depth 0,3):" in print_model(m)


def test_lossless_needs_bit_identity(tiny):
    tiny.blocks[2] = copy.deepcopy(tiny.blocks[0])
    w = tiny.blocks[2].attn_norm.weight
    w._data = w.data.clone()
    w._data[0] = torch.nextafter(w.data[0], torch.tensor(1e9))  # one ulp off: the FFNs still match
    m, logs = _run(copy.deepcopy(tiny), "arch.share_layers")
    assert [s["kind"] for s in logs[0].info["shared"]] == ["ffn"] and len(m.blocks) == LAYERS
    a, b = tiny.blocks[0].ffn.down.weight, tiny.blocks[2].ffn.down.weight
    a._data, b._data = a.data.clone(), b.data.clone()  # lazily loaded copies may share storage
    a.data[0, 0], b.data[0, 0] = 0.0, -0.0  # equal as numbers, not as bits
    _, logs = _run(tiny, "arch.share_layers")
    assert not logs[0].modified


def test_lossless_leaves_a_random_model_alone(tiny):
    text, before = print_model(tiny), _logits(tiny)
    m, logs = _run(tiny, "arch.share_layers")
    assert not logs[0].modified and logs[0].info["pairs"] == 0
    assert print_model(m) == text and torch.equal(_logits(m), before)


# ---------------------------------------------------------------- lossy

def test_select_prefers_more_pairs_then_less_error():
    errs = {0: 1.0, 1: 0.1, 2: 1.0}
    assert select(errs, 4, 1) == [1]
    assert select(errs, 4, 2) == [0, 2]  # two pairs beat one cheaper pair
    assert select({0: 0.5, 2: 0.1, 3: 0.2}, 5, 1) == [2]
    assert select({}, 5, 2) == []


@pytest.mark.parametrize("mode", ["block", "ffn"])
def test_lossy_picks_the_near_identical_pair(tiny, src, mode):
    _near_copy(tiny, 2, 3, ffn_only=mode == "ffn")
    before, nbytes = _logits(tiny), _bytes(tiny.blocks[3] if mode == "block" else tiny.blocks[3].ffn)
    calib = src.parent / "calib.txt"
    m, logs = _run(tiny, f"arch.share_layers:mode={mode},budget=0.2,calib={calib},n_seqs=4,seq_len=32")
    info = logs[0].info
    assert logs[0].modified and info["pairs"] == 1 and info["max_pairs"] == 1
    (pair,) = info["shared"]
    assert pair["depths"] == [2, 3] and pair["error"] == min(pair["errors"].values())
    assert set(pair["errors"]) == {"first", "second", "average"}
    assert info["weight_bytes_saved"] == nbytes and info["calib_tokens"] == 4 * 31
    assert 0 <= info["calib_kl"] < 0.05 and info["calib_top1"] > 0.8
    if mode == "block":
        assert len(m.blocks) == LAYERS - 1 and m.layers == [0, 1, 2, 2, 3]
    else:
        assert len(m.blocks) == LAYERS and m.blocks[2].ffn is m.blocks[3].ffn
    assert (_logits(m) - before).abs().max() < 0.5  # close, not equal: the pair was merged


def test_lossy_budget_bounds_and_forced_merge(tiny):
    m, logs = _run(copy.deepcopy(tiny), "arch.share_layers:mode=block,budget=0,n_seqs=2,seq_len=16")
    assert not logs[0].modified and logs[0].info["pairs"] == 0
    m, logs = _run(tiny, "arch.share_layers:mode=block,budget=0.5,merge=second,n_seqs=2,seq_len=16")
    assert logs[0].info["pairs"] == 2 and len(m.blocks) == 3
    assert all(s["merge"] == "second" and list(s["errors"]) == ["second"] for s in logs[0].info["shared"])
    assert len(set(m.layers)) == 3 and m.n_layers == LAYERS  # every depth keeps its own KV slot


# ---------------------------------------------------------------- IR round trip

def test_save_load_keeps_shared_objects(tiny, tmp_path):
    tiny.blocks = [tiny.blocks[i] for i in (0, 1, 3, 4)]  # depths 1 and 2 share a block ...
    tiny.layers = [0, 1, 1, 2, 3]
    tiny.blocks[3].ffn = tiny.blocks[0].ffn  # ... and blocks 0 and 3 an FFN
    before, text = _logits(tiny), print_model(tiny)
    m = load_ir(save_ir(tiny, tmp_path / "ir"))
    assert m.layers == [0, 1, 1, 2, 3] and m.blocks[3].ffn is m.blocks[0].ffn
    assert m.blocks[1].ffn is not m.blocks[0].ffn
    assert print_model(m) == text and "ffn: shared with blocks.0.ffn" in text
    assert torch.equal(_logits(m), before) and weight_bytes(m) == weight_bytes(tiny)


def test_load_resolves_a_reference_to_a_later_key(tiny, tmp_path):
    """Keys are sorted in ir.json, so a node may be referenced before it is read
    ("attn" sorts before "attn_norm"): it is decoded on demand, still one object."""
    b = tiny.blocks[0]
    b.attn.q_norm = b.attn_norm  # structure only: not a valid model, never verified here
    m = load_ir(save_ir(tiny, tmp_path / "ir"))
    assert m.blocks[0].attn.q_norm is m.blocks[0].attn_norm
    assert "$ref" in (tmp_path / "ir" / "ir.json").read_text()


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("opts,named", [
    ("budget=0.6", "budget"), ("budget=-0.1", "budget"), ("budget=nan", "budget"),
    ("mode=fancy", "mode"), ("merge=median", "merge")])
def test_bad_options_exit_2(src, tmp_path, opts, named):
    with pytest.raises(SlmcError, match=named):
        parse_pass(f"arch.share_layers:{opts}")
    res = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "out"), "--max-seq-len", "32",
                                    "--pass", f"arch.share_layers:{opts}"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("slmc: error:") and named in err
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- artifacts store shared weights once

# (target, backend, artifact files counted, bytes per IR float32 weight element in the artifact)
TARGETS = [("executorch", "xnnpack", ("model.pte",), 4), ("tflite", "cpu", ("model.tflite",), 4),
           ("coreml", "all", ("model.mlpackage/",), 2)]


def _size(manifest, prefixes):
    return sum(n for f, n in manifest["files"].items() if f.startswith(prefixes))


@pytest.mark.parametrize("target,backend,files,elem", TARGETS, ids=[t[0] for t in TARGETS])
def test_artifact_shrinks_by_the_shared_bytes_and_validates(src, tmp_path, target, backend, files, elem):
    calib = src.parent / "calib.txt"
    share = [f"arch.share_layers:mode=block,budget=0.2,calib={calib},n_seqs=2,seq_len=32",
             f"arch.share_layers:mode=ffn,budget=0.2,calib={calib},n_seqs=2,seq_len=32"]
    _, base = api.compile_model(src, target, backend, tmp_path / "base", max_seq_len=48)
    out, shared = api.compile_model(src, target, backend, tmp_path / "shared", passes=share, max_seq_len=48)
    kinds = [p["info"]["shared"][0]["kind"] for p in shared["pipeline"] if p["name"] == "arch.share_layers"]
    assert kinds == ["block", "ffn"] and shared["model"]["blocks"] == LAYERS - 1
    expected = (base["model"]["weight_bytes"] - shared["model"]["weight_bytes"]) * elem // 4
    saved = _size(base, files) - _size(shared, files)
    # stored once: the whole block and the whole FFN are gone; a little graph metadata (and the
    # removed block's rope matrix and norm constants) may go with them
    assert expected > 0 and -1024 <= saved - expected <= max(16384, 0.03 * expected), (saved, expected)
    report = api.validate_artifact(out, steps=8)
    assert report.passed, report.to_json()
    assert json.loads((out / "manifest.json").read_text())["validation"]["passed"]
