"""Quantized tables in scratch space (issue 17): each quantization pass moves a finished weight's
codes, scales and zeros into a scratch file (mapped back, pages let go), and the pass manager
moves whatever a pass left on the heap. The values, the sharing and every artifact byte stay
as they were; only where the tables live changes."""

import json

import pytest
import torch

import slmc.passes  # noqa: F401  (registers the passes)
from slmc import api
from slmc.build.digest import file_digests, stable_manifest
from slmc.compiler import reference
from slmc.compiler import spill as spill_mod
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import QuantWeight, named_weights
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.spill import Spill, spill_codes

SMALL = 4096  # the tiny model's tables count as big at this threshold
PASSES = {
    "rtn": "quant.rtn:bits=4,group_size=32,embed_bits=8,head_bits=4,act_bits=8",
    "gptq": "quant.gptq:bits=4,group_size=32,n_seqs=2,seq_len=16,embed_bits=8,head_bits=8,ends_group_size=0",
    "awq": "quant.awq:bits=4,group_size=32,n_seqs=2,seq_len=16,embed_bits=4,head_bits=4",
}
TABLES = ("codes", "scales", "zeros")


def _quantized(model_dir, spec: str, monkeypatch, threshold: int):
    monkeypatch.setattr(spill_mod, "MIN_BYTES", threshold)
    out, _ = PassManager([parse_pass(spec)]).run(import_hf(model_dir))
    return out, {p: w for p, w in named_weights(out) if isinstance(w, QuantWeight)}


@pytest.mark.parametrize("name", PASSES)
def test_quantized_tables_move_to_scratch_space_unchanged(tiny_llama_dir, monkeypatch, name):
    heap, hq = _quantized(tiny_llama_dir, PASSES[name], monkeypatch, 1 << 40)  # nothing moves
    moved, mq = _quantized(tiny_llama_dir, PASSES[name], monkeypatch, SMALL)
    assert hq.keys() == mq.keys() and mq
    big = [(p, f) for p, w in mq.items() for f in TABLES if getattr(w, f) is not None and getattr(w, f).nbytes >= SMALL]
    assert big, "the tiny model needs tables over the threshold for this test to mean anything"
    for p, f in big:
        assert spill_mod.file_backed(getattr(mq[p], f)), f"{p}.{f} is still on the heap"
        assert not spill_mod.file_backed(getattr(hq[p], f))
    for p in hq:
        for f in TABLES:
            a, b = getattr(hq[p], f), getattr(mq[p], f)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{p}.{f} changed"
    # sharing kept: the nodes that held one QuantWeight still hold one
    assert len(list(named_weights(heap))) == len(list(named_weights(moved)))
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    want = reference.forward(heap, ids)
    spill_mod.page_out_weights()  # the moved pages dropped: read again from the file
    assert torch.equal(reference.forward(moved, ids), want)
    assert spill_codes(moved, Spill("test")) == 0  # nothing is written twice


def test_control_a_changed_table_is_seen(tiny_llama_dir, monkeypatch):
    """The equality above can fail: one code changed in the scratch copy changes the logits."""
    heap, hq = _quantized(tiny_llama_dir, PASSES["rtn"], monkeypatch, 1 << 40)
    moved, mq = _quantized(tiny_llama_dir, PASSES["rtn"], monkeypatch, SMALL)
    p = next(p for p, w in mq.items() if spill_mod.file_backed(w.codes) and "ffn" in p)
    mq[p].codes[0, :8] = -mq[p].codes[0, :8] - 1  # a private write: the file keeps its bytes
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    assert not torch.equal(reference.forward(moved, ids), reference.forward(heap, ids))


# each target's round-to-nearest recipe (no calibration: the two compiles quantize alike)
FLOWS = [pytest.param("tflite", "cpu", "int8da-int4w-g32-rtn", id="tflite"),
         pytest.param("onnx", "cpu", "int4-g32-onnx", id="onnx"),
         pytest.param("executorch", "xnnpack", "int8da-int4w-g32-rtn", id="executorch", marks=pytest.mark.slow),
         pytest.param("coreml", "all", "int8-coreml", id="coreml")]


@pytest.mark.parametrize("target,backend,recipe", FLOWS)
def test_artifact_bytes_do_not_depend_on_where_the_codes_live(tiny_llama_dir, tmp_path, monkeypatch, target, backend,
                                                              recipe):
    """The same quantized compile with the tables on the heap and in scratch space gives the
    same files, byte for byte (targets read the codes through whatever tensor holds them)."""
    written = []
    quant = Spill.quant
    monkeypatch.setattr(Spill, "quant", lambda self, q: written.append(quant(self, q)) or written[-1])
    outs = []
    for name, threshold in (("heap", 1 << 40), ("moved", SMALL)):
        monkeypatch.setattr(spill_mod, "MIN_BYTES", threshold)
        out = tmp_path / name
        api.compile(api.CompileOptions(str(tiny_llama_dir), target, backend, str(out),
                                       recipe=recipe, max_seq_len=32))
        outs.append(out)
        if name == "heap":
            assert sum(written) == 0
    assert sum(written) > 0, "nothing moved to scratch space: the comparison would mean nothing"
    da, db = (file_digests(o) for o in outs)
    assert da.keys() == db.keys()
    differ = sorted(k for k in da if da[k] != db[k] and not k.startswith("manifest"))
    assert not differ, f"files differ: {differ}"  # named, before the manifest (which lists their sizes)
    ma, mb = (stable_manifest(json.loads((o / "manifest.json").read_text())) for o in outs)
    assert ma == mb


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_of_a_big_table_in_row_chunks_is_exact(monkeypatch, symmetric):
    """A table wider than RTN_CHUNK's rows goes in row chunks written into one table: the same
    codes, scales and zeros as in one piece (rows are independent), for a chunk that does not
    divide the rows too."""
    from slmc.compiler import quant

    w = torch.randn(203, 64, dtype=torch.bfloat16) * 3
    s = quant.QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    whole = quant.rtn(w, s)
    monkeypatch.setattr(quant, "RTN_CHUNK", 64 * 10)  # 10 rows at a time, the last chunk 3 rows
    chunked = quant.rtn(w, s)
    for f in TABLES:
        a, b = getattr(whole, f), getattr(chunked, f)
        assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and torch.equal(a, b))), f


def test_litert_compares_tied_tables_a_part_at_a_time(monkeypatch):
    """LiteRT's check that two weights sharing one constant have the same codes reads them a
    part at a time: a difference in the last part is still seen."""
    from slmc.targets.tflite import codes

    monkeypatch.setattr(codes, "_PART", 100)
    a = torch.randint(-8, 8, (37, 29), dtype=torch.int8)
    b = a.clone()
    assert codes._equal(a, b)
    b[-1, -1] = b[-1, -1] ^ 1
    assert not codes._equal(a, b)
    assert not codes._equal(a, a.reshape(29, 37)) and not codes._equal(a, a.to(torch.int16))
