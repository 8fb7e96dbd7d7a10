"""Data-free sampling reads every weight on every decode step; spill.streaming_pages lets each
block's file-mapped pages go once it has run, so the step holds one block, not the model
(issue 17: Llama-3.2-1B's calibrated compile held 4.7 GB of fp32 while it sampled)."""

import contextlib
import sys

import pytest
import torch

from slmc.compiler import calib
from slmc.compiler import spill as spill_mod
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.spill import Spill, file_ranges, let_go

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")


def _resident_kib(t: torch.Tensor) -> int:
    """Rss of the mapping holding `t`, from /proc/self/smaps."""
    p, inside = t.data_ptr(), False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= p < hi
        elif inside and line.startswith("Rss:"):
            return int(head[1])
    raise AssertionError("no mapping holds the tensor")


def test_let_go_unmaps_a_file_backed_tensor_and_keeps_its_values():
    t = torch.randn(1024, 1024)  # 4 MiB
    m = Spill("test").mapped(t)
    assert float(m.sum()) == float(t.sum())  # every page read
    assert _resident_kib(m) >= 4000  # control: the reading made them resident
    let_go(file_ranges([m]))
    assert _resident_kib(m) <= 8  # at most the partial pages at the ends stay
    assert torch.equal(m, t)  # read back from the file


def test_heap_tensors_are_never_let_go():
    t = torch.randn(1024, 1024)
    keep = t.clone()
    assert file_ranges([t]) == []  # so let_go cannot zero memory that lives nowhere else
    let_go(file_ranges([t]))
    assert torch.equal(t, keep)


def test_streaming_sampling_draws_the_same_tokens_and_lets_pages_go(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(spill_mod, "MIN_BYTES", 4096)  # the tiny model's matrices are mapped and streamed
    monkeypatch.setattr(calib, "HEAD_ROWS", 100)  # the head in several row blocks, the last one short
    m = import_hf(tiny_llama_dir)
    calls = []

    def counting(ranges):
        calls.append(sum(n for _, n in ranges))
        let_go(ranges)

    monkeypatch.setattr(spill_mod, "let_go", counting)
    streamed = calib._draw(m, 3, 12, seed=5, temperature=1.0, first="random")
    n_steps, head_blocks = 11, -(-m.vocab_size // 100)
    assert head_blocks > 1 and m.vocab_size % 100
    # every block and the head after they ran, and the head's row blocks as it runs, every step
    assert len(calls) == n_steps * (m.n_layers + 1 + head_blocks)
    assert min(calls) > 0  # each let go of some pages
    monkeypatch.setattr(calib, "_streamed", lambda lm: contextlib.nullcontext())
    calls.clear()
    plain = calib._draw(m, 3, 12, seed=5, temperature=1.0, first="random")
    assert not calls
    assert torch.equal(streamed, plain)


def test_the_calibration_lookup_leaves_no_embedding_pages_resident(tiny_llama_dir):
    """passes/_quant.embedded: looking up scattered rows maps nearly every page of a table in a
    file (each row, and the cached pages the kernel maps around each fault); those pages go
    right after, not at the end of the first block (Llama-3.2-1B: 250 MiB of codes)."""
    from slmc.compiler import reference
    from slmc.compiler.ir import QuantWeight
    from slmc.passes._quant import embedded

    ir = import_hf(tiny_llama_dir)
    codes = torch.randint(-8, 8, (8192, 512), dtype=torch.int8)  # 4 MiB
    ir.embed = QuantWeight(codes=Spill("test").mapped(codes), scales=torch.rand(8192, 16), zeros=None,
                           group_size=32, bits=4, symmetric=True)
    ids = torch.arange(0, 8192, 4).view(8, -1)  # a row every 2 KiB: every page
    want = reference.embed(ir, ids)
    assert _resident_kib(ir.embed.codes) >= 3500  # control: a plain lookup leaves them resident
    got = embedded(ir, ids)
    assert _resident_kib(ir.embed.codes) <= 8 and torch.equal(got, want)


def test_rtn_of_a_mapped_table_leaves_none_of_its_pages_resident():
    """quant.rtn and the ends' RTN read a big table once, a chunk of rows at a time: a mapped
    table's pages go as each chunk is done (Llama-3.2-1B's bf16 embedding is 0.5 GB)."""
    from slmc.compiler.quant import QuantScheme, rtn
    from slmc.compiler.spill import Spill

    w = torch.randn(8192, 1024).to(torch.bfloat16)  # 16 MiB: two chunks of RTN_CHUNK
    want = rtn(w, QuantScheme(bits=4, group_size=32, symmetric=True))
    m = Spill("test").mapped(w)
    got = rtn(m, QuantScheme(bits=4, group_size=32, symmetric=True))
    assert _resident_kib(m) <= 8 and torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    m.float().sum()  # control: reading it whole leaves its pages resident
    assert _resident_kib(m) >= 15000
