"""GGUF Q4_0/Q4_1/Q8_0 imported as codes (--keep-codes): the file's own integers and
scales, bit for bit; a target that cannot hold them gets them re-quantized, with the
added error reported, and the artifact still validates against that reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")

from slmc.api import compile_model, validate_artifact  # noqa: E402
from slmc.cli import main  # noqa: E402
from slmc.compiler import reference  # noqa: E402
from slmc.compiler.families.llama import tiny_config  # noqa: E402
from slmc.compiler.importers.gguf import import_gguf  # noqa: E402
from slmc.compiler.importers.gguf_blocks import block_codes  # noqa: E402
from slmc.compiler.ir import QuantWeight, named_weights  # noqa: E402
from slmc.errors import SlmcError  # noqa: E402

from test_gguf import IDS, Q, write_gguf  # noqa: E402
from tiny import make_hf_model, save_ascii_tokenizer  # noqa: E402

QTYPES = {"blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.1.attn_k.weight": Q.Q8_0,
          "blk.0.ffn_down.weight": Q.Q4_1, "blk.1.ffn_gate.weight": Q.Q4_0, "token_embd.weight": Q.Q8_0}


def test_q4_1_block_golden():
    """One hand-written block: d=0.5, m=-1, byte j = (j+16 high nibble, j low nibble)."""
    qs = bytes(((15 - j) << 4) | j for j in range(16))
    raw = np.frombuffer(np.float16(0.5).tobytes() + np.float16(-1.0).tobytes() + qs, np.uint8)
    w = block_codes(raw.reshape(1, 20), "Q4_1", (1, 32))
    assert w.codes[0, :16].tolist() == list(range(16))
    assert w.codes[0, 16:].tolist() == [15 - j for j in range(16)]
    assert w.scales.item() == 0.5 and w.zeros.item() == 2.0
    assert torch.equal(w.float()[0, :3], torch.tensor([-1.0, -0.5, 0.0]))


@pytest.mark.parametrize("qt", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_blocks_dequantize_like_gguf(qt):
    rng = np.random.default_rng(int(qt))
    data = rng.standard_normal((8, 96)).astype(np.float32) + (0.7 if qt == Q.Q4_1 else 0)
    data[3, :32] = 0.25  # a flat block (Q4_1: d = 0)
    raw = gguf.quants.quantize(data, qt)
    want = gguf.quants.dequantize(raw, qt)
    w = block_codes(raw, qt.name, data.shape)
    assert w.symmetric == (qt != Q.Q4_1) and w.bits == (8 if qt == Q.Q8_0 else 4)
    np.testing.assert_allclose(w.float().numpy(), want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.fixture(scope="module")
def tiny_codes(tmp_path_factory):
    cfg = tiny_config()
    model = make_hf_model(cfg, seed=3)
    d = tmp_path_factory.mktemp("gguf-codes")
    write_gguf(d / "tiny.gguf", model, cfg, QTYPES)
    save_ascii_tokenizer(d)
    return d / "tiny.gguf"


def test_codes_kept_and_equal_to_the_float_import(tiny_codes):
    kept, flat = import_gguf(tiny_codes, keep_codes=True), import_gguf(tiny_codes)
    assert kept.source["keep_codes"] and "keep_codes" not in flat.source
    q = dict(named_weights(kept))
    assert q["blocks.0.attn.q.weight"].dtype == "sint4g32" and q["blocks.0.attn.q.weight"].algorithm == "gguf:q4_0"
    assert q["blocks.0.attn.k.weight"].dtype == "aint4g32" and q["blocks.1.attn.k.weight"].dtype == "sint8g32"
    assert q["embed"].algorithm == "gguf:q8_0"
    assert not isinstance(q["blocks.0.attn.v.weight"], QuantWeight)  # F32 in the file stays float
    for name, w in named_weights(flat):
        np.testing.assert_allclose(q[name].float(), w.float(), rtol=0, atol=1e-6)
    a, b = reference.forward(kept, IDS), reference.forward(flat, IDS)
    assert (a - b).abs().max().item() < 1e-4


def test_permuted_rows_carry_their_groups(tiny_codes):
    """attn_q/attn_k rows are un-permuted with their scales (and zeros)."""
    w = import_gguf(tiny_codes, keep_codes=True).block_at(0).attn.k.weight
    f = import_gguf(tiny_codes).block_at(0).attn.k.weight.float()
    assert w.zeros is not None
    assert torch.allclose(w.float(), f, atol=1e-6)


def _pipeline(manifest, name="quant.requant"):
    return [p for p in manifest["pipeline"] if p["name"] == name]


def test_coreml_keeps_exact_codes_and_requantizes_q4_1(tiny_codes, tmp_path):
    """Core ML fp32 holds Q4_0/Q8_0 (integer offsets) unchanged; Q4_1's fractional zero points
    are re-rounded and the error reported."""
    out = tmp_path / "cm"
    _, manifest = compile_model(tiny_codes, "coreml", "cpu:precision=fp32,kv=io", out, max_seq_len=64,
                                keep_codes=True)
    (req,) = _pipeline(manifest)
    assert req["options"]["scope"] == "linears" and req["info"]["requantized"] == 2  # the two Q4_1 tensors
    assert 0 < req["info"]["rel_rms_err_max"] < 0.2
    algos = manifest["quantization"]["algorithms"]
    assert "gguf:q4_0" in algos and "gguf:q8_0" in algos and "gguf:q4_1+requant" in algos
    assert validate_artifact(out, steps=16).passed


@pytest.mark.slow  # ~90 s; the Core ML case above covers the fitting in the default suite
def test_xnnpack_requantizes_to_its_scheme_and_validates(tiny_codes, tmp_path):
    out = tmp_path / "pte"
    _, manifest = compile_model(tiny_codes, "executorch", "xnnpack", out, max_seq_len=64, keep_codes=True)
    done = {}
    for p in _pipeline(manifest):
        key = (p["options"]["scope"], p["options"]["only_bits"])
        done[key] = p["info"]["requantized"]
    # 4-bit blocks: symmetric, bf16 scales, int8 activations; Q8_0 per channel; the tied Q8_0
    # table gets a separate head (XNNPACK cannot share it) while the embedding keeps its codes
    assert done == {("linears", 4): 4, ("linears", 8): 1, ("head", 8): 1}
    report = validate_artifact(out, steps=16)
    assert report.passed, report.to_json()


def test_litert_keeps_codes_requantizes_q4_1_and_validates(tiny_codes, tmp_path):
    """LiteRT holds Q4_0/Q8_0 (and the Q8_0 table as embedding and head) unchanged; Q4_1's
    fractional zero points are re-rounded like Core ML's, and the .tflite reads back exact."""
    from slmc.api import reference_model
    from slmc.targets import get_target

    out = tmp_path / "t"
    r = CliRunner().invoke(main, ["compile", str(tiny_codes), "--target", "tflite", "--keep-codes",
                                  "--max-seq-len", "64", "-o", str(out)])
    assert r.exit_code == 0, r.output
    from slmc.targets.base import read_manifest

    manifest = read_manifest(out)
    (req,) = _pipeline(manifest)
    assert req["options"]["scope"] == "linears" and req["info"]["requantized"] == 2
    rb = get_target("tflite").readback(reference_model(out, manifest), out / "model.tflite")
    assert rb.exact, rb.missing
    report = validate_artifact(out, steps=16)
    assert report.passed, report.to_json()


def test_nan_block_scale_is_refused(tmp_path):
    cfg = tiny_config()
    model = make_hf_model(cfg, seed=4)
    path = tmp_path / "nan.gguf"
    write_gguf(path, model, cfg, {"blk.0.attn_q.weight": Q.Q8_0})
    raw = bytearray(path.read_bytes())
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    off = int(t.data_offset)
    raw[off:off + 2] = np.float16(np.nan).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(SlmcError, match="NaN"):
        import_gguf(path, keep_codes=True)
