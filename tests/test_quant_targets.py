"""Quantized artifacts hold slmc's own codes: read back out of the artifact, equal to the
IR's, and the artifact's logits match the quantized reference (top-1 >= 99 %).

Flows are (target, backend, passes); each compiles the tiny Llama (with the byte-level
tokenizer, so validation decodes text) and checks readback + validation.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from slmc.api import compile_model, reference_model, validate_artifact
from slmc.cli import main
from slmc.compiler.ir import QuantWeight, named_weights
from slmc.targets import get_target
from slmc.targets.base import read_manifest

XNN = "scale_dtype=bfloat16,act_bits=8"
FLOWS = {
    # 8da4w everywhere: block linears, the head int4, the embedding int4 (embedding_4bit); this pass is
    # the int8da-int4w-g32-rtn recipe's, so the flow takes conftest's shared artifact (tiny_et_8da4w)
    "pte-8da4w": ("executorch", "xnnpack", None, "pte", "model.pte"),
    "pte-8da8w": ("executorch", "xnnpack", [f"quant.rtn:bits=8,group_size=0,{XNN},embed_bits=8,head_bits=8"],
                  "pte", "model.pte"),
    # asymmetric codes with offsets, fp32 compute; int8 embedding, int4 head
    "coreml-asym-fp32": ("coreml", "cpu:precision=fp32,kv=io",
                         ["quant.rtn:bits=4,group_size=32,symmetric=false,head_bits=4,embed_bits=8"],
                         "mlpackage", "model.mlpackage"),
    # fp16 compute, stateful multifunction: fp16 scales keep the codes exact
    "coreml-fp16": ("coreml", "all", ["quant.rtn:bits=4,group_size=32,scale_dtype=float16"],
                    "mlpackage", "model.mlpackage"),
    # INT4 blockwise block linears and head, int8 per-channel embedding (per-axis DEQUANTIZE)
    "tflite-int4": ("tflite", "cpu", ["quant.rtn:bits=4,group_size=32,head_bits=4,embed_bits=8"],
                    "tflite", "model.tflite"),
    # XNNPACK's 8da4w through LiteRT: BlockwiseQuantization int4 filters, fp16 (bf16-exact) scales
    "tflite-8da4w": ("tflite", "cpu", [f"quant.rtn:bits=4,group_size=32,{XNN},head_bits=4,embed_bits=4"],
                     "tflite", "model.tflite"),
    # asymmetric int8 blockwise linears and head (SUB zeros), asymmetric int4 per-channel
    # embedding (per-axis zero points)
    "tflite-asym": ("tflite", "cpu", ["quant.rtn:bits=8,group_size=16,symmetric=false,head_bits=8",
                                      "quant.rtn:bits=4,group_size=0,symmetric=false,embed_bits=4"],
                    "tflite", "model.tflite"),
}


SLOW_FLOWS = {"pte-8da8w", "coreml-fp16", "tflite-asym"}  # CI runs them (make test-slow); the default suite the others


@pytest.fixture(scope="module", params=[pytest.param(f, marks=pytest.mark.slow if f in SLOW_FLOWS else ())
                                        for f in sorted(FLOWS)])
def built(request, tiny_llama_dir, tmp_path_factory):
    target, backend, passes, kind, name = FLOWS[request.param]
    out = tmp_path_factory.mktemp("q") / request.param
    if passes is None:
        request.getfixturevalue("tiny_et_8da4w")(out)
    else:
        compile_model(tiny_llama_dir, target, backend, out, passes=passes, max_seq_len=64)
    return out, target, name


def test_artifact_holds_slmcs_codes_and_scales(built):
    out, target, name = built
    ref = reference_model(out, read_manifest(out))
    rb = get_target(target).readback(ref, out / name)
    n_quant = sum(isinstance(w, QuantWeight) for _, w in named_weights(ref))
    assert rb.checked == n_quant > 0
    assert rb.missing == []


def test_quantized_artifact_matches_quantized_reference(built):
    out, _, _ = built
    report = validate_artifact(out, steps=24)
    assert report.passed, report.to_json()
    assert report.top1_agreement >= 0.99
    assert read_manifest(out)["quantization"]["schemes"]


def test_readback_notices_one_changed_code(built):
    """The readback is not vacuous: flip one code in the reference and it is reported."""
    out, target, name = built
    ref = reference_model(out, read_manifest(out))
    path, w = next((p, w) for p, w in named_weights(ref) if isinstance(w, QuantWeight))
    w.codes = w.codes.clone()
    hi = 2 ** (w.bits - 1) - 1 if w.symmetric else 2 ** w.bits - 1
    w.codes[0, 0] = hi if int(w.codes[0, 0]) != hi else hi - 1
    rb = get_target(target).readback(ref, out / name)
    assert any(m.startswith(path) for m in rb.missing)


# ------------------------------------------------------------------ legality: exit 2, one line

@pytest.mark.parametrize("args, words", [
    (["-t", "executorch", "-b", "xnnpack", "--pass", "quant.rtn:bits=4,group_size=32"], "needs act_bits=8"),
    (["-t", "executorch", "-b", "xnnpack", "--pass", "quant.rtn:act_bits=8"], "scale_dtype=bfloat16"),
    (["-t", "executorch", "-b", "xnnpack", "--pass", f"quant.rtn:bits=4,group_size=32,symmetric=false,{XNN}"],
     "symmetric"),
    (["-t", "executorch", "-b", "xnnpack", "--pass", f"quant.rtn:bits=8,group_size=32,{XNN}"], "group_size=0"),
    (["-t", "executorch", "-b", "portable", "--pass", "quant.rtn"], "no quantized tensors"),
    (["-t", "executorch", "-b", "xnnpack", "--recipe", "int4-g32-coreml"], "built for coreml"),
    (["-t", "executorch", "--recipe", "nope"], "unknown recipe"),
    (["-t", "tflite", "--pass", f"quant.rtn:{XNN},symmetric=false"], "symmetric"),
    (["-t", "coreml", "-b", "ane", "--pass", "quant.rtn:scale_dtype=float16"], "Neural Engine layout"),
    (["-t", "coreml", "-b", "all", "--pass", "quant.rtn"], "scale_dtype=float16"),
    (["-t", "executorch", "--pass", "quant.rtn:scale_dtype=fp8"], "scale_dtype"),
])
def test_illegal_quantization_for_the_flow_exits_2(tiny_llama_dir, tmp_path, args, words):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-o", str(out), "--max-seq-len", "32", *args])
    assert r.exit_code == 2, r.output
    assert words in r.output
    assert not out.exists()


def test_calib_flag_checks_files_and_records_them(tiny_llama_dir, tmp_path):
    bad = tmp_path / "empty.txt"
    bad.write_text("")
    r = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-o", str(tmp_path / "o1"),
                                  "--recipe", "int4-g32-xnnpack", "--calib", str(bad)])
    assert r.exit_code == 2 and "empty" in r.output
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    # LiteRT, the recipe's faster flow: --calib and its record belong to the pass pipeline, ahead of any
    # lowering (the recipe's ExecuTorch lowering is test_gptq_artifact's)
    out, manifest = compile_model(tiny_llama_dir, "tflite", "cpu", tmp_path / "o2", max_seq_len=64,
                                  recipe="int4-g32-xnnpack", calib=[str(text)],
                                  passes=[])
    files = manifest["calibration_files"]
    assert files and files[0]["path"] == str(text.resolve()) and len(files[0]["sha256"]) == 64
    fitted = next(p for p in manifest["pipeline"] if p["name"] in ("quant.awq", "quant.gptq"))
    assert fitted["options"]["calib"] == str(text.resolve())
    assert manifest["recipe"] == "int4-g32-xnnpack"


def test_fake_quant_tokens_matches_torchao():
    """The reference's int8 activation rounding is torchao's, which XNNPACK implements."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant)

    from slmc.compiler.quant import fake_quant_tokens

    x = torch.randn(5, 64) * torch.linspace(0.1, 10, 64)
    assert torch.equal(fake_quant_tokens(x), _apply_int8_act_asym_per_token_quant_dequant(x))


# slow: the pte-8da4w flow above runs the flagship recipe's passes in the default suite
@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n)
                                  for n in ("int8da-int4w-g32", "int8da-int4w-g32-rtn", "int8da-int8w",
                                            "int4-g32-xnnpack", "gptq-int4-g32-xnnpack",
                                            "awq-int4-g32-xnnpack", "int4-g32-coreml", "int8-coreml",
                                            "int4-g32-litert", "int8-litert")])
def test_each_recipe_compiles_its_flow_and_validates(tiny_llama_dir, tmp_path, name):
    from slmc.recipes import RECIPES

    target, _, backend = RECIPES[name].flows[0].partition(":")
    backend = backend or ("cpu" if target == "tflite" else "cpu:precision=fp32,kv=io")
    out, manifest = compile_model(tiny_llama_dir, target, backend, tmp_path / name, max_seq_len=64, recipe=name)
    assert manifest["recipe"] == name and manifest["quantization"]
    if name == "int8da-int4w-g32":  # head and embedding quantized too, as ExecuTorch's Llama export does
        ref = reference_model(out, manifest)
        assert isinstance(ref.embed, QuantWeight) and isinstance(ref.lm_head.weight, QuantWeight)
    report = validate_artifact(out, steps=16)
    assert report.passed, report.to_json()


# LiteRT finds each quantized weight in litert_torch's flatbuffer by its float image; every
# family's lowering (fused qkv, MoE experts, soft-capping, tied heads) must keep those bytes.
# Gemma 2 does not (measured 2026-12-02): the converter folds the final soft-cap's x / 2.0 into
# the tied head's float constant (W / 2), which is no QuantWeight's image, so the head stays a
# float32 FULLY_CONNECTED weight; the readback, reading the head in the logits matmul, reports it
# (the embedding's lookup holds the codes). A lowering fix (keep the head's matmul unscaled) is
# owed in targets/tflite (target.py / codes.py).
# Gemma 2 was a strict xfail until 7f90dfd: the converter folded the soft-cap's 1/2.0 into the
# tied head (float W/2, no codes). The weights now reach it as signature inputs, which it
# cannot fold (targets/tflite/weights.py), so the head's codes go in like every other table.
@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in ("qwen2_moe", "phi3") else [pytest.mark.slow])
                                    for f in ("llama", "gemma2", "phi3", "qwen2_moe")])
def test_litert_codes_on_each_family(family, tmp_path):
    from tiny import save_ascii_tokenizer, save_hf_model

    from slmc.compiler.families import FAMILIES, load_all
    load_all()
    cfg = FAMILIES[family].tiny_config()
    src = tmp_path / family
    save_hf_model(cfg, src)
    save_ascii_tokenizer(src, cfg["vocab_size"])
    out, manifest = compile_model(src, "tflite", "cpu", tmp_path / "out", max_seq_len=48,
                                  passes=["quant.rtn:bits=4,group_size=16,embed_bits=8"])
    rb = get_target("tflite").readback(reference_model(out, manifest), out / "model.tflite")
    assert rb.exact, rb.missing
    report = validate_artifact(out, steps=16)
    assert report.passed and report.top1_agreement == 1.0, report.to_json()


def test_litert_never_falls_back_to_float_silently(tiny_llama_dir, tmp_path):
    """A quantized weight whose float image is not in the flatbuffer is an error, not a float tensor."""
    from slmc.compiler.pass_manager import PassManager, parse_pass
    from slmc.errors import SlmcError
    from slmc.targets.tflite.codes import store_codes

    out, manifest = compile_model(tiny_llama_dir, "tflite", "cpu", tmp_path / "f", max_seq_len=32)
    data = (out / "model.tflite").read_bytes()
    quantized, _ = PassManager([parse_pass("quant.rtn:bits=4,group_size=16")]).run(reference_model(out, manifest))
    with pytest.raises(SlmcError, match="did not store"):
        store_codes(data, quantized)
