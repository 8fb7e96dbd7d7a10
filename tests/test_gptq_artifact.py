"""GPTQ's ExecuTorch 8da4w artifact against `slmc validate` (a known bug, kept visible).

The artifact of `--recipe gptq-int4-g32-xnnpack` fails validate's readback on the tiny model:
14 of 16 quantized weights' stored scales differ from the reference IR that validate rebuilds
from the manifest (AWQ's artifact of the same flow passes). Found when AWQ scales + GPTQ, the
method bench/results/quant_calib.md measured best, was about to become the recipes' method; the
recipes stay on AWQ until this passes. Strict: the test fails once the bug is fixed, so the
marker goes and the recipes can move."""

import pytest

from slmc import api


@pytest.mark.xfail(strict=True, reason="GPTQ's stored scales differ from the replayed reference (issue 18 note)")
def test_gptq_recipe_artifact_validates(tiny_llama_dir, tmp_path):
    out = tmp_path / "a"
    api.compile_model(str(tiny_llama_dir), "executorch", None, out, max_seq_len=48, recipe="gptq-int4-g32-xnnpack")
    r = api.validate(out, api.ValidateOptions(record=False))
    assert r.verdict == "PASS", r.reasons


def test_awq_recipe_artifact_validates(tiny_llama_dir, tmp_path):
    """The control beside it: the same flow with AWQ (the recipes' method) passes."""
    out = tmp_path / "a"
    api.compile_model(str(tiny_llama_dir), "executorch", None, out, max_seq_len=48, recipe="awq-int4-g32-xnnpack")
    r = api.validate(out, api.ValidateOptions(record=False))
    assert r.verdict == "PASS", r.reasons
