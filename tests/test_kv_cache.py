"""The KV-cache spec (kv.cache pass) lowered per target and checked against the reference,
which models the cache's dtype (an fp16 cache rounds K and V to half precision; an int8
cache rounds them to int8 codes with one scale per token and KV head).

Every legal (target, layout, dtype) runs a prompt plus greedy decode longer than the
prompt, so decode reads rows written by earlier calls; illegal combinations are refused at
compile time with the reason and exit 2.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from slmc.api import compile_model, load, validate_artifact
from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.pass_manager import PassManager, parse_pass

LEGAL = [(t, b, lay, dt) for t, b in [("executorch", "xnnpack"), ("tflite", "cpu"),
                                      ("coreml", "cpu:precision=fp32,kv=io")]
         for lay in ("bhsd", "bshd") for dt in ("float32", "float16", "int8")
         if not (t == "coreml" and lay == "bshd" and dt == "float16")  # one Core ML fp16 case is enough
         and not (t == "coreml" and dt == "int8")]  # refused (below)
# The default suite runs one fp16 and one int8 flow per target (fp32 BHSD is every other test's
# flow); CI the rest.
DEFAULT = {("executorch", "bshd", "float16"), ("tflite", "bhsd", "float16"), ("coreml", "bhsd", "float16"),
           ("executorch", "bhsd", "int8")}


@pytest.mark.parametrize("target,backend,layout,dtype", [
    pytest.param(*f, marks=() if (f[0], f[2], f[3]) in DEFAULT else pytest.mark.slow, id="-".join(f[::2] + f[3:]))
    for f in LEGAL])
def test_kv_spec_validates_against_reference(tiny_llama_dir, tmp_path, target, backend, layout, dtype):
    out, manifest = compile_model(tiny_llama_dir, target, backend, tmp_path / "a", max_seq_len=64,
                                  passes=[f"kv.cache:layout={layout},dtype={dtype}"])
    assert manifest["kv_cache_spec"]["layout"] == layout and manifest["kv_cache_spec"]["dtype"] == dtype
    report = validate_artifact(out, steps=40)
    assert report.passed, report.to_json()
    if dtype == "int8":  # the int8 rounding moves logits by ~5e-3 (test below); the artifact does it too
        assert max(report.prefill_max_abs, report.decode_max_abs) < 1e-4, report.to_json()
    if target == "tflite":
        k0 = next(i for i in manifest["io"]["decode"]["inputs"] if i["name"] == "kv_cache_k_0")
        assert k0["dtype"] == dtype


def test_reference_models_an_fp16_cache(tiny_llama_dir):
    ids = torch.tensor([[3, 9, 27, 81, 5, 1, 2, 7]])
    m32 = load(tiny_llama_dir, max_seq_len=64)
    m16, _ = PassManager([parse_pass("kv.cache:dtype=float16")]).run(load(tiny_llama_dir, max_seq_len=64))
    a, b = reference.forward(m32, ids), reference.forward(m16, ids)
    assert not torch.equal(a, b)  # rounding K/V is visible ...
    assert (a - b).abs().max() < 1e-2  # ... and small


def test_reference_models_an_int8_cache(tiny_llama_dir):
    ids = torch.tensor([[3, 9, 27, 81, 5, 1, 2, 7]])
    m32 = load(tiny_llama_dir, max_seq_len=64)
    m8, _ = PassManager([parse_pass("kv.cache:dtype=int8")]).run(load(tiny_llama_dir, max_seq_len=64))
    gap = (reference.forward(m32, ids) - reference.forward(m8, ids)).abs().max()
    assert 1e-3 < gap < 5e-2  # larger than the float flows' 2e-3 tolerance, so the flows above see it


def test_int8_cache_scales_are_per_token_and_head():
    x = torch.randn(1, 2, 5, 8)
    x[0, 1, 3] *= 100  # one loud token must not coarsen the others' codes
    y = reference.kv_int8_roundtrip(x)
    err = (y - x).abs() / x.abs().amax(-1, keepdim=True)
    assert err.max() <= 0.5 / 127 + 1e-6


@pytest.mark.parametrize("target,opts,words", [
    ("tflite", "arena=true", "arena"),
    ("tflite", "window=16,sink_tokens=4", "ring-buffer"),
    ("executorch", "arena=true", "arena"),
    ("executorch", "layout=bhds", "layout"),
    ("executorch", "window=8,sink_tokens=8", "sink_tokens"),
    ("coreml", "dtype=int8", "int8"),
])
def test_kv_spec_the_target_cannot_express_exits_2(tiny_llama_dir, tmp_path, target, opts, words):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-t", target, "-o", str(out),
                                  "--max-seq-len", "32", "--pass", f"kv.cache:{opts}"])
    assert r.exit_code == 2, r.output
    assert words in r.output and not out.exists()
