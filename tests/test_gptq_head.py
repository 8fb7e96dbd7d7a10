"""quant.gptq quantizes the head by GPTQ on the final norm's output (RTN there was most of
int8da-int4w-g32's loss, bench/results/quant_split.md), in row chunks, and keeps a tied table
one table (share_tied) unless told not to."""

import copy

import pytest
import torch

import slmc.passes  # noqa: F401  (registers the passes)
import slmc.passes.quant_gptq as qg
from slmc.compiler import reference
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import QuantWeight
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.quant import QuantScheme, rtn

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, "
        "his chin nuzzled into his breast, slipped quickly through the glass doors. ") * 12
HELD_OUT = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
            "in my purse, I thought I would sail about a little and see the watery part of the world. ") * 6


def _gptq(src, tmp_path, extra=""):
    cal = tmp_path / "cal.txt"
    cal.write_text(TEXT)
    p = parse_pass(f"quant.gptq:bits=4,group_size=16,n_seqs=4,seq_len=64,calib={cal}{extra}")
    return PassManager([p]).run(copy.deepcopy(src))[0]


def _head_input(m, text):
    """The final norm's output on held-out text: what the head reads."""
    ids = torch.tensor([[ord(c) % m.vocab_size for c in text[:200]]])
    x = reference.embed(m, ids)
    for d in range(m.n_layers):
        x = reference.block(m.block_at(d), x, torch.arange(ids.shape[1]))
    return reference.rms_norm(x, m.final_norm).reshape(-1, m.hidden_size)


def test_head_gptq_beats_rtn_on_text_it_never_saw(tiny_llama_dir, tmp_path):
    fp32 = import_hf(tiny_llama_dir)
    m = _gptq(fp32, tmp_path, ",head_bits=4")
    assert isinstance(m.lm_head.weight, QuantWeight) and m.lm_head.weight.algorithm == "gptq"
    x = _head_input(m, HELD_OUT)  # the quantized blocks' output, as at run time
    w = fp32.embed.float()
    want = x @ w.T
    err_gptq = float(((x @ m.lm_head.weight.float().T) - want).pow(2).mean())
    err_rtn = float(((x @ rtn(w, QuantScheme(4, 16)).float().T) - want).pow(2).mean())
    # GPTQ minimises exactly this error on the calibration text; on other text it must still win
    assert err_gptq < err_rtn, (err_gptq, err_rtn)
    # control: the head quant.rtn makes (what quant.gptq made before) fails the same comparison
    r = PassManager([parse_pass("quant.rtn:bits=4,group_size=16,head_bits=4")]).run(copy.deepcopy(fp32))[0]
    assert not float(((x @ r.lm_head.weight.float().T) - want).pow(2).mean()) < err_rtn


def test_tied_table_stays_one_table(tiny_llama_dir, tmp_path):
    fp32 = import_hf(tiny_llama_dir)
    assert fp32.lm_head is None  # the tiny Llama is tied
    m = _gptq(fp32, tmp_path, ",embed_bits=4,head_bits=4")
    e, h = m.embed, m.lm_head.weight
    assert torch.equal(e.codes, h.codes) and torch.equal(e.scales, h.scales)
    assert e is not h  # equal content, two IR nodes (LiteRT stores equal codes once)
    # control: share_tied=false keeps the embedding's own RTN codes, which differ from the head's
    m2 = _gptq(fp32, tmp_path, ",embed_bits=4,head_bits=4,share_tied=false")
    assert not torch.equal(m2.embed.codes, m2.lm_head.weight.codes)
    assert torch.equal(m2.embed.codes, rtn(fp32.embed.float(), QuantScheme(4, 16)).codes)
    # an int8 embedding beside an int4 head is two schemes: nothing to share
    m3 = _gptq(fp32, tmp_path, ",embed_bits=8,head_bits=4")
    assert m3.embed.bits == 8 and m3.lm_head.weight.bits == 4


def test_head_rows_in_chunks_match_one_call(tiny_llama_dir, tmp_path, monkeypatch):
    """GPTQ treats rows independently, so chunking the vocabulary changes nothing."""
    fp32 = import_hf(tiny_llama_dir)
    whole = _gptq(fp32, tmp_path, ",head_bits=4").lm_head.weight
    monkeypatch.setattr(qg, "HEAD_ROWS", 37)  # not a divisor of the 256 rows: a short last chunk
    chunked = _gptq(fp32, tmp_path, ",head_bits=4").lm_head.weight
    assert torch.equal(whole.codes, chunked.codes) and torch.equal(whole.scales, chunked.scales)


def test_every_runtime_keeps_one_table_for_embedding_and_head():
    """ExecuTorch stores a shared quantized table once now (model.ptd; tests/test_tied_weights.py),
    as LiteRT does: no recipe asks GPTQ for share_tied=false on either runtime."""
    from slmc.api import compile_passes

    for target in ("executorch", "tflite"):
        passes = compile_passes("int8da-int4w-g32", target)
        assert passes[-1].startswith("quant.gptq:") and "share_tied" not in " ".join(passes), passes
        opts = parse_pass(passes[-1]).options
        assert opts.share_tied is True and opts.head_bits == opts.embed_bits == 4


def test_a_head_scheme_that_cannot_fit_is_refused_before_calibration(tiny_llama_dir, monkeypatch):
    """The head is quantized after the blocks now; its group size is still checked first."""
    from slmc.errors import SlmcError
    from slmc.passes._options import CalibOptions

    def no_calibration(self, ir):
        raise AssertionError("calibration ran before the head's scheme was checked")

    monkeypatch.setattr(CalibOptions, "tokens", no_calibration)
    with pytest.raises(SlmcError, match="head_bits.*group size 48"):
        PassManager([parse_pass("quant.gptq:bits=4,group_size=32,head_bits=4,ends_group_size=48")]).run(
            import_hf(tiny_llama_dir))


def test_a_head_read_from_the_checkpoint_is_quantized_from_scratch_space(tiny_llama_dir, tmp_path, monkeypatch):
    """A head table not yet loaded is read once into a scratch file and its chunks come from
    there (each chunk's pages let go after it), not held on the heap through the head's GPTQ
    (0.5 GB of bf16 at Llama-3.2-1B); the codes are the same as from a table already loaded."""
    from slmc.compiler import spill

    seen, real = [], qg.gptq
    monkeypatch.setattr(qg, "gptq", lambda W, *a, **k: seen.append(spill.file_backed(W)) or real(W, *a, **k))
    monkeypatch.setattr(qg, "HEAD_ROWS", 100)
    fp32 = import_hf(tiny_llama_dir)
    from_file = _gptq(fp32, tmp_path, ",head_bits=4").lm_head.weight
    assert seen[-3:] == [True, True, True]  # 256 rows: three chunks, all mapped
    seen.clear()
    loaded = copy.deepcopy(fp32)
    assert loaded.embed.data is not None and loaded.embed.loaded  # control: a table already on the heap
    from_heap = _gptq(loaded, tmp_path, ",head_bits=4").lm_head.weight
    assert seen[-3:] == [False, False, False]
    assert torch.equal(from_file.codes, from_heap.codes) and torch.equal(from_file.scales, from_heap.scales)
