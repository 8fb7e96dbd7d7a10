"""AutoAWQ (GEMM) and GPTQ checkpoints: packed the way AutoGPTQ's `QuantLinear.pack` and
AutoAWQ's `WQLinear_GEMM.from_linear` pack them, imported with their own codes (--keep-codes)
bit for bit, or dequantized exactly; hand-packed golden words pin the bit layouts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from slmc.compiler import reference
from slmc.compiler.families.llama import tiny_config
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.importers.prequant import PrequantSource, read_prequant_config
from slmc.compiler.ir import QuantWeight
from slmc.errors import SlmcError, UnsupportedError

from test_bad_input import expect_error  # noqa: E402
from tiny import make_hf_model, save_ascii_tokenizer  # noqa: E402

IDS = torch.tensor([[1, 5, 77, 3, 200, 9, 42, 18, 255, 0, 64, 7]])
LINEARS = {"self_attn.q_proj": lambda b: b.attn.q, "self_attn.k_proj": lambda b: b.attn.k,
           "self_attn.v_proj": lambda b: b.attn.v, "self_attn.o_proj": lambda b: b.attn.o,
           "mlp.gate_proj": lambda b: b.ffn.gate, "mlp.up_proj": lambda b: b.ffn.up,
           "mlp.down_proj": lambda b: b.ffn.down}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map, written out here independently


# ---------------------------------------------------------------- packers (the upstream loops)


def gptq_pack_qweight(q: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ QuantLinear.pack: intweight = codes.T [in, out]; word row r ORs input r*p + k
    shifted by bits*k."""
    iw, per = q.T.astype(np.uint32), 32 // bits
    out = np.zeros((iw.shape[0] // per, iw.shape[1]), np.uint32)
    for row in range(out.shape[0]):
        for k in range(per):
            out[row] |= iw[row * per + k] << np.uint32(bits * k)
    return out.view(np.int32)


def gptq_pack_qzeros(stored: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ: zeros [G, out] (already `zeros -= 1` for v1) packed along the output dim."""
    z, per = stored.astype(np.uint32), 32 // bits
    out = np.zeros((z.shape[0], z.shape[1] // per), np.uint32)
    for col in range(out.shape[1]):
        for k in range(per):
            out[:, col] |= z[:, col * per + k] << np.uint32(bits * k)
    return out.view(np.int32)


def awq_pack(x: np.ndarray) -> np.ndarray:
    """AutoAWQ from_linear: [rows, n] 4-bit ints -> [rows, n / 8], column 8c + order_map[i] in lane i."""
    x = x.astype(np.uint32)
    out = np.zeros((x.shape[0], x.shape[1] // 8), np.uint32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= x[:, col * 8 + AWQ_ORDER[i]] << np.uint32(4 * i)
    return out.view(np.int32)


def quantize(w: torch.Tensor, bits: int, g: int, sym: bool):
    """Test-side RTN: (q uint [out, in], integer zeros [out, G], fp16-exact scales [out, G])."""
    maxq = 2**bits - 1
    grp = w.reshape(w.shape[0], -1, g)
    if sym:
        s = (grp.abs().amax(-1) / (2 ** (bits - 1) - 1)).half().float()
        z = torch.full_like(s, 2 ** (bits - 1))
    else:
        lo, hi = grp.amin(-1).clamp(max=0), grp.amax(-1).clamp(min=0)
        s = ((hi - lo) / maxq).half().float()
        z = torch.round(-lo / s).clamp(1, maxq)  # >= 1: AutoGPTQ v1's `zeros - 1` must not wrap
    q = torch.clamp(torch.round(grp / s[..., None]) + z[..., None], 0, maxq).reshape(w.shape)
    return q.to(torch.int64), z, s


# ---------------------------------------------------------------- tiny checkpoints


@pytest.fixture(scope="module")
def float_model():
    cfg = tiny_config()  # hidden 64, intermediate 128: groups of 32 divide every input dim
    assert not cfg.get("attention_bias") and not cfg.get("mlp_bias")
    sd = {k: v.detach().clone().contiguous() for k, v in make_hf_model(cfg, seed=7).state_dict().items()}
    sd.pop("lm_head.weight")  # tied to the embedding
    return cfg, sd


def write_checkpoint(folder: Path, float_model, method="gptq", bits=4, group=32, sym=False, fmt="gptq",
                     act_order=False, extra_qc=None) -> dict:
    """A tiny Llama with every block linear packed; returns {base: (q, z, s, g_idx)} as packed."""
    cfg, sd = float_model
    sd, packed = dict(sd), {}
    gen = torch.Generator().manual_seed(1)
    for name in [k for k in sd if k.endswith("_proj.weight")]:
        base, w = name[: -len(".weight")], sd.pop(name)
        n_in = w.shape[1]
        perm = torch.randperm(n_in, generator=gen) if act_order else torch.arange(n_in)
        q, z, s = quantize(w[:, perm], bits, group if group > 0 else n_in, sym)
        q = q[:, torch.argsort(perm)]  # back to the input order; input perm[j] is in group j // g
        g_idx = torch.empty(n_in, dtype=torch.int32)
        g_idx[perm] = (torch.arange(n_in) // (group if group > 0 else n_in)).int()
        packed[base] = (q, z, s, g_idx)
        if method == "gptq":
            sd[f"{base}.qweight"] = torch.from_numpy(gptq_pack_qweight(q.numpy(), bits))
            offset = 1 if fmt == "gptq" else 0
            sd[f"{base}.qzeros"] = torch.from_numpy(gptq_pack_qzeros((z.T - offset).numpy(), bits))
            sd[f"{base}.g_idx"] = g_idx
        else:
            sd[f"{base}.qweight"] = torch.from_numpy(awq_pack(q.T.numpy()))
            sd[f"{base}.qzeros"] = torch.from_numpy(awq_pack(z.T.numpy()))
        sd[f"{base}.scales"] = s.T.contiguous().half()
    qc = ({"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": act_order,
           "checkpoint_format": fmt} if method == "gptq" else
          {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm"})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {**qc, **(extra_qc or {})}}))
    save_ascii_tokenizer(folder)
    return packed


def dequant(q, z, s, g_idx) -> torch.Tensor:
    gi = g_idx.long()
    return (q.float() - z[:, gi]) * s[:, gi]


def linears(model):
    for i in range(model.n_layers):
        for role, get in LINEARS.items():
            yield f"model.layers.{i}.{role}", get(model.block_at(i))


VARIANTS = {"gptq-v1-asym": dict(method="gptq"), "gptq-v2-asym": dict(method="gptq", fmt="gptq_v2"),
            "gptq-sym": dict(method="gptq", sym=True), "gptq-8bit-perrow": dict(method="gptq", bits=8, group=-1),
            "awq": dict(method="awq")}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_codes_kept_exactly_and_float_import_dequantizes(variant, float_model, tmp_path, caplog):
    kw = VARIANTS[variant]
    packed = write_checkpoint(tmp_path / variant, float_model, **kw)
    with caplog.at_level(logging.WARNING, logger="slmc"):
        kept = import_hf(tmp_path / variant, keep_codes=True)
        flat = import_hf(tmp_path / variant)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # all tensors used, no requant
    assert kept.source["keep_codes"] and "keep_codes" not in flat.source
    bits, sym = kw.get("bits", 4), kw.get("sym", False)
    for base, lin in linears(kept):
        q, z, s, g_idx = packed[base]
        w = lin.weight
        assert isinstance(w, QuantWeight) and w.algorithm == f"{kw['method']}-import"
        assert (w.bits, w.symmetric, w.group_size) == (bits, sym, kw.get("group", 32) if kw.get("group", 32) > 0
                                                       else q.shape[1])
        if sym:
            assert w.codes.dtype == torch.int8 and w.zeros is None
            assert torch.equal(w.codes.long(), q - 2 ** (bits - 1))
        else:
            assert w.codes.dtype == torch.uint8 and torch.equal(w.codes.long(), q)
            assert torch.equal(w.zeros, z.float())
        assert torch.equal(w.scales, s)
    for base, lin in linears(flat):
        assert lin.weight.dtype == "float32"
        assert torch.equal(lin.weight.float(), dequant(*packed[base]))
    a, b = reference.forward(kept, IDS), reference.forward(flat, IDS)
    assert (a - b).abs().max().item() < 1e-4


# ---------------------------------------------------------------- golden words


def golden_source(tmp_path: Path, tensors: dict, **qc) -> PrequantSource:
    save_file(tensors, str(tmp_path / "g.safetensors"))
    cfg = read_prequant_config({"quantization_config": qc}, "config.json")
    return PrequantSource([tmp_path / "g.safetensors"], cfg, keep_codes=True)


def i32(*words: int) -> list[int]:
    return [w - 2**32 if w >= 2**31 else w for w in words]


def test_awq_golden_words(tmp_path):
    """[out=8, in=2], one group. from_linear puts column 8c + [0,2,4,6,1,3,5,7][i] in lane i (bits 4i..),
    so word 0x76543210 (lane i = i) holds columns 0..7 = 0,4,1,5,2,6,3,7."""
    src = golden_source(tmp_path, {
        "x.qweight": torch.tensor([i32(0x76543210), i32(0xFEDCBA98)], dtype=torch.int32),  # [in=2, 1]
        "x.qzeros": torch.tensor([i32(0x87654321)], dtype=torch.int32),  # lane i = i + 1
        "x.scales": torch.tensor([[0.5, 1, 2, 4, 0.25, 8, 16, 0.125]], dtype=torch.float16)},
        quant_method="awq", bits=4, group_size=-1, version="gemm", zero_point=True)
    assert src.has("x.weight")
    w = src.weight("x.weight")
    assert w.codes[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert w.codes[:, 1].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]
    assert w.zeros[:, 0].tolist() == [1, 5, 2, 6, 3, 7, 4, 8]
    assert (w.group_size, w.symmetric) == (2, False)
    assert w.float()[1].tolist() == [(4 - 5) * 1.0, (12 - 5) * 1.0]
    assert src.used == {"x.qweight", "x.qzeros", "x.scales"}


@pytest.mark.parametrize("fmt,offset", [("gptq", 1), ("gptq_v2", 0)])
def test_gptq_golden_words_and_zero_offset(tmp_path, fmt, offset):
    """[out=8, in=8], 4-bit, one group. pack(): qweight[row] |= intweight[row*8 + k] << 4k, so lane k of
    column o is input k of output o; qzeros lane k is output k's zero, stored minus 1 in v1."""
    words = i32(0x76543210, 0xFEDCBA98) + i32(0x01234567) * 6
    src = golden_source(tmp_path, {
        "x.qweight": torch.tensor([words], dtype=torch.int32), "x.qzeros": torch.tensor([i32(0x76543210)],
                                                                                        dtype=torch.int32),
        "x.scales": torch.full((1, 8), 0.5, dtype=torch.float16)},
        quant_method="gptq", bits=4, group_size=-1, sym=False, checkpoint_format=fmt)
    w = src.weight("x.weight")
    assert w.codes[0].tolist() == list(range(8)) and w.codes[1].tolist() == list(range(8, 16))
    assert w.codes[2].tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert w.zeros[:, 0].tolist() == [k + offset for k in range(8)]
    assert w.float()[1, 0].item() == (8 - (1 + offset)) * 0.5


def test_gptq_8bit_golden_and_sign_bits(tmp_path):
    """8-bit: 4 inputs per word, low byte first; a word with its sign bit set still splits cleanly."""
    col = i32(0x04030201, 0xFF80017F)  # inputs 0..3 = 1,2,3,4; inputs 4..7 = 127,1,128,255
    qw = torch.tensor([[c] * 4 for c in col], dtype=torch.int32)  # [in/4 = 2, out = 4]
    src = golden_source(tmp_path, {
        "x.qweight": qw, "x.qzeros": torch.tensor([i32(0x7F7F7F7F)], dtype=torch.int32),  # v1: 127 + 1
        "x.scales": torch.ones((1, 4), dtype=torch.float16)},
        quant_method="gptq", bits=8, group_size=-1, sym=True)
    w = src.weight("x.weight")
    assert w.symmetric and w.zeros is None  # every zero at 128
    assert w.codes[0].tolist() == [v - 128 for v in (1, 2, 3, 4, 127, 1, 128, 255)]


def test_sym_flag_with_off_center_zeros_stays_asymmetric(tmp_path):
    src = golden_source(tmp_path, {
        "x.qweight": torch.zeros((1, 8), dtype=torch.int32),
        "x.qzeros": torch.tensor([i32(0x77777776)], dtype=torch.int32),  # output 0: zero 7, others 8
        "x.scales": torch.ones((1, 8), dtype=torch.float16)},
        quant_method="gptq", bits=4, group_size=-1, sym=True)
    w = src.weight("x.weight")
    assert not w.symmetric and w.zeros[:, 0].tolist() == [7] + [8] * 7


# ---------------------------------------------------------------- act-order


def test_act_order_requantized_with_warning(float_model, tmp_path, caplog):
    packed = write_checkpoint(tmp_path / "ao", float_model, sym=True, act_order=True)
    with caplog.at_level(logging.WARNING, logger="slmc"):
        kept = import_hf(tmp_path / "ao", keep_codes=True)
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "act-order" in msg and "14 GPTQ" in msg and "relative RMS error" in msg
    flat = import_hf(tmp_path / "ao")
    for (base, lk), (_, lf) in zip(linears(kept), linears(flat)):
        exact = dequant(*packed[base])
        assert torch.equal(lf.weight.float(), exact)  # the float import stays exact
        w = lk.weight
        assert w.algorithm == "gptq-import+requant" and w.symmetric and (w.bits, w.group_size) == (4, 32)
        err = ((w.float() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()
        assert 0 < err < 0.2


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good(float_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good") / "gptq"
    write_checkpoint(d, float_model, sym=True)
    return d


def variant_of(good: Path, tmp_path: Path, qc=None, tensors=None) -> Path:
    """A copy of `good` with its quantization_config replaced (qc names a quant_method) or
    updated (it does not), and some tensors edited."""
    d = tmp_path / "bad"
    d.mkdir()
    cfg = json.loads((good / "config.json").read_text())
    if qc:
        cfg["quantization_config"] = qc if "quant_method" in qc else {**cfg["quantization_config"], **qc}
    (d / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(good / "model.safetensors"))
    for name, fn in (tensors or {}).items():
        sd[name] = fn(sd[name])
    save_file(sd, str(d / "model.safetensors"))
    return d


Q = "model.layers.1.self_attn.k_proj"


def _nan(s):
    s = s.clone()
    s[0, 3] = float("nan")
    return s


BAD = {
    "qweight-shape": (None, {f"{Q}.qweight": lambda t: t[:, :-8].contiguous()}, SlmcError, "qweight has shape"),
    "group-not-dividing": ({"group_size": 48}, None, SlmcError, "group size 48 does not divide"),
    "nan-scales": (None, {f"{Q}.scales": _nan}, SlmcError, "NaN"),
    "g_idx-range": (None, {f"{Q}.g_idx": lambda t: t + 1}, SlmcError, "outside the 2 groups"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None, UnsupportedError, "awq, gptq"),
    "awq-gemv": ({"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": 32}, None,
                 UnsupportedError, "supported: gemm"),
    "gptq-3bit": ({"bits": 3}, None, UnsupportedError, "3-bit"),
    "marlin": ({"checkpoint_format": "marlin"}, None, UnsupportedError, "gptq_v2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("keep", [True, False])
def test_bad_input_is_one_clear_error(case, keep, good, tmp_path):
    qc, tensors, exc, text = BAD[case]
    d = variant_of(good, tmp_path, qc, tensors)
    with pytest.raises(exc, match=text) as e:
        import_hf(d, keep_codes=keep)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("qc,ok", [
    ({"quant_method": "awq", "format": "gemm", "backend": "auto", "bits": 4, "group_size": 32}, True),  # transformers 5
    ({"quant_method": "awq", "version": "GEMM", "w_bit": 4, "q_group_size": 64, "zero_point": True}, True),
    ({"quant_method": "awq", "version": "gemm", "backend": "llm-awq"}, False),  # another packing order
    ({"quant_method": "awq", "version": "gemm", "zero_point": False}, False),
    ({"quant_method": "gptq", "bits": 4, "format": "gptq_v2"}, True),
    ({"quant_method": "gptq", "bits": 4, "dynamic": {"-:.*down": {}}}, False),
    ({"quant_method": "fp8"}, False)])
def test_quantization_config_variants(qc, ok):
    if ok:
        assert read_prequant_config({"quantization_config": qc}, "config.json") is not None
    else:
        with pytest.raises(UnsupportedError):
            read_prequant_config({"quantization_config": qc}, "config.json")


def test_packed_tensors_without_quantization_config(good, tmp_path):
    d = variant_of(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SlmcError, match="no quantization_config"):
        import_hf(d)


@pytest.mark.parametrize("case", ["qweight-shape", "nan-scales"])
def test_cli_refuses_with_exit_2_and_no_output(case, good, tmp_path):
    _, tensors, _, text = BAD[case]
    d = variant_of(good, tmp_path, tensors=tensors)
    outroot = tmp_path / "outroot"
    outroot.mkdir()
    expect_error(["compile", d, "--target", "coreml", "--keep-codes", "-o", outroot / "out"],
                 text, Q, outroot=outroot)


# ---------------------------------------------------------------- end to end


def test_gptq_sym_codes_compile_to_coreml_and_validate(good, tmp_path):
    """Core ML holds symmetric int4 codes with fp16-exact scales as they are: no requant, and the
    artifact's constexpr ops hold the checkpoint's codes and scales."""
    from slmc.api import compile_model, reference_model, validate_artifact
    from slmc.targets import get_target

    pytest.importorskip("coremltools")
    out = tmp_path / "cm"
    _, manifest = compile_model(good, "coreml", "cpu:precision=fp32,kv=io", out, max_seq_len=64,
                                keep_codes=True)
    assert not [p for p in manifest["pipeline"] if p["name"] == "quant.requant"]
    assert manifest["quantization"]["algorithms"] == ["gptq-import"]
    assert manifest["source"]["keep_codes"]
    rb = get_target("coreml").readback(reference_model(out, manifest), out / "model.mlpackage")
    assert rb.checked == 14 and rb.missing == []
    assert validate_artifact(out, steps=16).passed
