"""Data-free calibration knobs (temperature, first token), the ends' own group size, `slmc eval
--calib`, and the int4 recipes quantizing the embedding and the head."""

import json

import pytest
import torch
from click.testing import CliRunner

import slmc.passes  # noqa: F401  (registers the passes)
from slmc.cli import main
from slmc.compiler.calib import calibration_ids
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import QuantWeight, Weight
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.errors import SlmcError
from slmc.recipes import RECIPES


def test_first_token_and_temperature(tiny_llama_dir):
    m = import_hf(tiny_llama_dir)
    bos = calibration_ids(m, [], 4, 16, seed=0, first="bos")
    assert (bos[:, 0] == m.bos_id).all()
    rnd = calibration_ids(m, [], 4, 16, seed=0)
    assert not (rnd[:, 0] == m.bos_id).all()  # control: random first tokens
    # a low temperature concentrates the samples: fewer distinct tokens than at temperature 1
    cold = calibration_ids(m, [], 4, 64, seed=0, temperature=0.05)
    assert len(torch.unique(cold[:, 1:])) < len(torch.unique(calibration_ids(m, [], 4, 64, seed=0)[:, 1:]))
    for kw, word in (({"temperature": 0.0}, "temperature"), ({"first": "eos"}, "first")):
        with pytest.raises(SlmcError, match=word):
            calibration_ids(m, [], 4, 16, seed=0, **kw)


def test_ends_group_size(tiny_llama_dir):
    m = import_hf(tiny_llama_dir)
    p = parse_pass("quant.rtn:bits=4,group_size=32,embed_bits=8,head_bits=8,ends_group_size=0")
    m, _ = PassManager([p]).run(m)
    for w in (m.embed, m.lm_head.weight):
        assert isinstance(w, QuantWeight) and w.bits == 8 and w.group_size == w.shape[1]  # one group per row
    blocks = [lin.weight for b in m.blocks for lin in (b.attn.q, b.ffn.down)]
    assert all(w.bits == 4 and w.group_size == 32 for w in blocks)
    # control: -1 (the default) keeps the block linears' group size
    m2, _ = PassManager([parse_pass("quant.rtn:bits=4,group_size=32,embed_bits=8")]).run(import_hf(tiny_llama_dir))
    assert m2.embed.group_size == 32


def test_eval_calib_feeds_the_data_aware_pass(tiny_llama_dir, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 30)
    ev = tmp_path / "ev.txt"
    ev.write_text("a stitch in time saves nine, and many hands make light work " * 20)
    base = ["eval", str(tiny_llama_dir), "--text", str(ev), "--window", "64", "--max-tokens", "300", "--json"]
    gptq = "quant.gptq:bits=4,group_size=16,n_seqs=4,seq_len=32"

    def ppl(*args):
        r = CliRunner().invoke(main, base + list(args))
        assert r.exit_code == 0, r.output
        return json.loads(r.output)["perplexity"]

    via_flag = ppl("--pass", gptq, "--calib", str(text))
    assert via_flag == ppl("--pass", f"{gptq},calib={text}")  # the same as calib= in the pass
    assert via_flag != ppl("--pass", gptq)  # control: data-free calibration gives other codes
    r = CliRunner().invoke(main, base + ["--pass", "quant.rtn", "--calib", str(text)])
    assert r.exit_code == 2 and "--calib" in r.output  # no data-aware pass to feed
    r = CliRunner().invoke(main, base + ["--pass", gptq, "--calib", str(tmp_path / "missing.txt")])
    assert r.exit_code == 2


INT4 = [n for n, r in RECIPES.items() if any("bits=4" in p for p in r.passes)]


@pytest.mark.parametrize("name", INT4)
def test_every_int4_recipe_quantizes_embedding_and_head(name):
    """Issue 17 item 3: no int4 recipe leaves the (tied) table in float."""
    opts = [parse_pass(p).options for p in RECIPES[name].passes]
    # the pass that quantizes (quant.awq:quantize=false only folds scales for the GPTQ after it)
    q = [o for o in opts if getattr(o, "bits", 0) == 4 and getattr(o, "quantize", True)][-1]
    assert q.embed_bits in (4, 8)
    # the head: its own quantized table, or the quantized embedding shared (targets that allow it)
    tied_ok = all(f.split(":")[0] in ("tflite", "coreml", "onnx") for f in RECIPES[name].flows)
    assert q.head_bits in (4, 8) or (tied_ok and q.head_bits == 0)
    assert "bench/results/" in RECIPES[name].about  # the measurement it was chosen by


def test_list_shows_measured_quality(tmp_path, monkeypatch):
    import slmc.recipes as recipes

    rows = [{"variant": "fp32", "perplexity": {"a": 10.0, "b": 20.0}, "weight_bytes": 2**20},
            {"variant": "x", "kind": "data-free", "perplexity": {"a": 11.0, "b": 23.0}, "weight_bytes": 3 * 2**20}]
    (tmp_path / "q.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    monkeypatch.setattr(recipes, "RESULTS", tmp_path)
    r = recipes.Recipe("r", ("tflite",), ("tflite",), "about", "q.json:x")
    text = recipes.measured_quality(r)
    assert "+12.5 %" in text and "weights 3 MiB" in text and "mean of 2 unseen texts" in text  # (10 % + 15 %) / 2
    # bench/quant_split.py's rows: a recipe's own passes (int8 activations, quantized ends), one text
    split = [{"row": "fp32", "perplexity": 10.0, "weight_bytes": 2**20},
             {"row": "r --calib", "perplexity": 13.0, "weight_bytes": 2**20}]
    (tmp_path / "s.json").write_text(json.dumps({"meta": {}, "rows": split}))
    text = recipes.measured_quality(recipes.Recipe("r", (), (), "", "s.json:r --calib"))
    assert "+30.0 %" in text and "recipe's passes" in text and "calibrated" in text and "weight-only" not in text
    for missing in ("q.json:y", "other.json:x", ""):  # controls: no such row, no such file, none named
        assert recipes.measured_quality(recipes.Recipe("r", (), (), "", missing)) == "not measured"


def test_data_free_samples_are_drawn_once_per_weights(tiny_llama_dir, monkeypatch):
    import slmc.compiler.calib as calib

    m = import_hf(tiny_llama_dir)
    calib._SAMPLES.clear()
    draws = []
    real = calib._draw
    monkeypatch.setattr(calib, "_draw", lambda *a: draws.append(a[1:]) or real(*a))
    a = calibration_ids(m, [], 4, 16, seed=3)
    b = calibration_ids(m, [], 4, 16, seed=3)
    assert torch.equal(a, b) and len(draws) == 1  # the second ask is served from the cache
    a[:] = 0
    assert not torch.equal(a, calibration_ids(m, [], 4, 16, seed=3))  # callers get copies
    calibration_ids(m, [], 4, 16, seed=3, temperature=0.5)
    assert len(draws) == 2  # control: other settings draw anew
    w = m.blocks[0].attn.q.weight
    m.blocks[0].attn.q.weight = Weight(w.float() * 1.001)
    calibration_ids(m, [], 4, 16, seed=3)
    assert len(draws) == 3  # control: other weights draw anew
    calib._SAMPLES.clear()
    assert torch.equal(calibration_ids(import_hf(tiny_llama_dir), [], 4, 16, seed=3), b)  # a fresh draw: the same


def test_gptq_clip_search_lowers_the_weighted_error():
    from slmc.compiler.quant import QuantScheme, group_params
    from slmc.passes.quant_gptq import clipped_params

    g = torch.Generator().manual_seed(0)
    s = QuantScheme(4, 16, True)
    x = torch.randn(256, 64, generator=g)
    H = x.T @ x / 256
    Hb = torch.stack([H[k * 16:(k + 1) * 16, k * 16:(k + 1) * 16] for k in range(4)])
    W = torch.randn(32, 64, generator=g)
    W[:, ::16] *= 4  # one outlier per group: the full range wastes most codes on it

    def err(sc):
        deq = torch.clamp(torch.round(W / sc.repeat_interleave(16, 1)), -8, 7) * sc.repeat_interleave(16, 1)
        E = (deq - W).view(32, 4, 16).transpose(0, 1)
        return (torch.bmm(E, Hb) * E).sum(-1).T  # [rows, groups]

    full, _ = group_params(W, s)
    clipped, z = clipped_params(W, Hb, s)
    assert z is None and bool((err(clipped) <= err(full) + 1e-6).all())
    assert float(err(clipped).sum()) < 0.9 * float(err(full).sum())
    assert bool((clipped < full - 1e-6).any())
    # control: weights on the code grid already (every value a multiple of max / 7): nothing to gain
    grid = torch.randint(-7, 8, (32, 64), generator=g).float()
    grid[:, ::16] = 7.0
    sc, _ = clipped_params(grid, Hb, s)
    assert torch.allclose(sc, group_params(grid, s)[0])


def test_gptq_clip_option_changes_the_codes(tiny_llama_dir):
    spec = "quant.gptq:bits=4,group_size=16,n_seqs=4,seq_len=32,act_order=true"
    q0, _ = PassManager([parse_pass(spec + ",clip=false")]).run(import_hf(tiny_llama_dir))
    q1, logs = PassManager([parse_pass(spec + ",clip=true")]).run(import_hf(tiny_llama_dir))
    w0, w1 = q0.blocks[0].ffn.down.weight, q1.blocks[0].ffn.down.weight
    assert isinstance(w1, QuantWeight) and logs[0].info["quantized"] == 14
    assert not torch.equal(w0.scales, w1.scales)
    assert bool((w1.scales <= w0.scales + 1e-6).all())  # clipping only shrinks a static group's range
