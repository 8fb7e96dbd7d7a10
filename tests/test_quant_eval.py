"""quant.rtn and `slmc eval`: numbers before and after, and the bad inputs."""

import json

import pytest
import torch
from click.testing import CliRunner

import slmc.passes  # noqa: F401  (registers the passes)
from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import QuantWeight
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.quant import QuantScheme, rtn
from slmc.errors import SlmcError


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
def test_rtn_codes_scales_and_error_bound(bits, sym):
    w = torch.randn(8, 64)
    s = QuantScheme(bits, 16, sym)
    q = rtn(w, s)
    assert q.codes.dtype == (torch.int8 if sym else torch.uint8)
    assert int(q.codes.min()) >= s.qmin and int(q.codes.max()) <= s.qmax
    assert (q.zeros is None) == sym and q.scales.shape == (8, 4)
    # round-to-nearest: every weight within half a step of its dequantized value
    step = q.scales.repeat_interleave(16, 1)
    assert bool(((q.float() - w).abs() <= step / 2 + 1e-6).all())


def test_rtn_pass_quantizes_every_projection_and_int8_stays_close(tiny_llama_dir):
    m = import_hf(tiny_llama_dir, max_seq_len=32)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    ref = reference.forward(m, ids)
    q8, logs = PassManager([parse_pass("quant.rtn:bits=8,group_size=16")]).run(m)
    assert logs[0].info["quantized"] == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert isinstance(q8.blocks[1].ffn.down.weight, QuantWeight) and not isinstance(q8.embed, QuantWeight)
    d8 = float((reference.forward(q8, ids) - ref).abs().max())
    q4, _ = PassManager([parse_pass("quant.rtn:bits=4,group_size=16")]).run(import_hf(tiny_llama_dir, max_seq_len=32))
    d4 = float((reference.forward(q4, ids) - ref).abs().max())
    assert 0 < d8 < d4  # quantization changes the logits, int8 much less than int4
    assert d8 < 0.05


def test_rtn_head_and_embedding_bits(tiny_llama_dir):
    m, _ = PassManager([parse_pass("quant.rtn:bits=4,group_size=16,head_bits=8,embed_bits=8")]).run(
        import_hf(tiny_llama_dir, max_seq_len=32))
    assert m.embed.bits == 8 and m.lm_head.weight.bits == 8 and m.blocks[0].attn.q.weight.bits == 4


def test_group_size_that_does_not_divide_is_refused(tiny_llama_dir, tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(tiny_llama_dir), "--pass", "quant.rtn:group_size=24"])
    assert res.exit_code == 2 and "group size 24 does not divide" in res.output


def test_eval_reports_perplexity_kl_and_top1(tiny_llama_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    res = CliRunner().invoke(main, ["eval", str(tiny_llama_dir), "--text", str(text), "--pass",
                                    "quant.rtn:bits=4,group_size=16", "--window", "64", "--stride", "32",
                                    "--max-tokens", "300", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["tokens_scored"] == 299 and r["perplexity"] > 1 and r["kl_divergence"] > 0
    assert 0 < r["top1_agreement"] < 1
    # the unquantized model against itself: KL 0, perfect agreement, same perplexity
    res = CliRunner().invoke(main, ["eval", str(tiny_llama_dir), "--text", str(text), "--window", "64",
                                    "--max-tokens", "300", "--reference", str(tiny_llama_dir), "--json"])
    r = json.loads(res.output)
    assert r["kl_divergence"] == pytest.approx(0, abs=1e-6) and r["top1_agreement"] == 1.0
    assert r["perplexity"] == pytest.approx(r["reference_perplexity"])


@pytest.mark.parametrize("content,message", [(b"", "empty"), (b"\x00\x01\x02binary", "binary"),
                                             (b"too short", "too short")])
def test_bad_text_files_are_refused(tiny_llama_dir, tmp_path, content, message):
    f = tmp_path / "t.txt"
    f.write_bytes(content)
    res = CliRunner().invoke(main, ["eval", str(tiny_llama_dir), "--text", str(f), "--window", "64"])
    assert res.exit_code == 2 and message in res.output and "t.txt" in res.output


def test_windows_score_every_token_once():
    from slmc.runtime_tests.evaluate import windows

    for n, w, s in [(10, 4, 2), (33, 8, 3), (5, 8, 4), (300, 64, 32)]:
        scored = [p for a, b, first in windows(n, w, s) for p in range(first, b)]
        assert scored == list(range(1, n))
    # non-overlapping windows: a window's first token has no context and is not scored
    scored = [p for a, b, first in windows(100, 32, 32) for p in range(first, b)]
    assert scored == [p for p in range(1, 100) if p % 32]
