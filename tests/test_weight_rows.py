"""A checkpoint's big tables are read a chunk of rows at a time (issue 17: Llama-3.2-1B's bf16
embedding is 0.5 GB): the import's NaN check, the ends' RTN and GPTQ's head copy never hold one
whole, and give what a whole read gives."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from slmc.compiler import ir as ir_mod
from slmc.compiler.importers.hf import check_finite
from slmc.compiler.importers.safetensors_source import SafetensorsSource
from slmc.compiler.quant import RTN_CHUNK, QuantScheme, rtn
from slmc.compiler.spill import Spill


@pytest.fixture
def table(tmp_path):
    t = torch.randn(3 * RTN_CHUNK // 256 + 5, 256).bfloat16()  # three chunks and a ragged one
    p = tmp_path / "w.safetensors"
    save_file({"t": t, "small": torch.randn(3, 4)}, str(p))
    src = SafetensorsSource([p])
    reads = []
    real = src._load
    src._load = lambda name, r0=None, r1=None: (reads.append((name, r0, r1)), real(name, r0, r1))[1]
    return t, src, reads


def test_rows_read_only_those_rows(table):
    t, src, reads = table
    w = src.weight("t")
    assert torch.equal(w.rows(7, 19), t[7:19]) and torch.equal(w.rows(len(t) - 2, len(t) + 9), t[-2:])
    assert reads == [("t", 7, 19), ("t", len(t) - 2, len(t))] and not w.loaded
    assert torch.equal(torch.cat(list(w.row_chunks())), t)
    assert all(r0 is not None for _, r0, _ in reads)  # never the whole tensor


def test_rtn_of_a_lazy_table_reads_chunks_and_equals_rtn_of_the_whole(table):
    t, src, reads = table
    s = QuantScheme(bits=4, group_size=32, symmetric=True)
    got, want = rtn(src.weight("t"), s), rtn(t, s)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert len(reads) == 4 and max(r1 - r0 for _, r0, r1 in reads) * 256 <= RTN_CHUNK


def test_gptqs_head_copy_in_scratch_space_is_written_chunk_by_chunk(table):
    t, src, reads = table
    m = Spill("test").mapped_weight(src.weight("t"))
    assert torch.equal(m, t) and len(reads) == 4


class _Model:  # what check_finite reads of a model besides its weights (named_weights, patched)
    source = {"path": "x"}


def test_the_nan_check_reads_chunks_and_still_finds_a_nan_in_the_last_rows(table, tmp_path, monkeypatch, caplog):
    from slmc.errors import SlmcError

    t, src, reads = table
    monkeypatch.setattr("slmc.compiler.importers.hf.named_weights", lambda m: [("t", src.weight("t"))])
    m = _Model()
    with caplog.at_level(logging.WARNING):
        check_finite(m, strict=False)
    assert "NaN" not in caplog.text and len(reads) == 4
    bad = t.clone()
    bad[-1, 3] = float("nan")  # control: in the ragged last chunk
    p = tmp_path / "bad.safetensors"
    save_file({"t": bad}, str(p))
    src2 = SafetensorsSource([p])
    monkeypatch.setattr("slmc.compiler.importers.hf.named_weights", lambda m: [("t", src2.weight("t"))])
    with pytest.raises(SlmcError, match="NaN/Inf: t"):
        check_finite(m, strict=True)


def test_a_source_without_parts_is_read_once_per_walk_and_not_kept():
    loads = []
    t = torch.randn(RTN_CHUNK // 64 * 2 + 1, 64)
    w = ir_mod.Weight(shape=tuple(t.shape), dtype="float32", loader=lambda: (loads.append(1), t)[1])
    assert torch.equal(torch.cat(list(w.row_chunks())), t)
    assert loads == [1] and not w.loaded


def test_the_samples_key_reads_chunks_and_does_not_depend_on_what_is_loaded(table, monkeypatch):
    import slmc.compiler.calib as calib

    t, src, reads = table
    monkeypatch.setattr(calib, "named_weights", lambda w: [("t", w)])  # a one-weight stand-in model
    w = src.weight("t")
    lazy = calib.fingerprint(w)
    assert reads and all(r0 is not None for _, r0, _ in reads) and not w.loaded
    w.data  # noqa: B018  loaded now
    assert calib.fingerprint(w) == lazy
    w2 = src.weight("t")
    w2.rebind(t.clone().index_fill_(0, torch.tensor([len(t) - 1]), 0.5))  # control: one row differs
    assert calib.fingerprint(w2) != lazy
