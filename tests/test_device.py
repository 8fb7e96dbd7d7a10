"""`slmc validate --on qemu-arm64`: tiny models' artifacts (ExecuTorch and LiteRT, float and
8da4w; ONNX float) checked inside the arm64 emulator: their own check bundle plus the host's
teacher-forced windows (>= 512 positions), judged on the host against the host's reference
under the flow's bounds, by the verdict host validation uses (marker `emulator`: needs
`slmc device setup qemu-arm64`, which `make emulator` runs; .ci/run does both).

Without the emulator set up these tests fail with setup's one-line reason: never skipped."""

from __future__ import annotations

import json
import re
import time

import pytest

from slmc import api
from slmc.errors import SlmcError

FLOWS = [("executorch", None), ("executorch", "int8da-int4w-g32-rtn"), ("executorch", "int8da-int4w-g32"),
         ("tflite", None), ("tflite", "int8da-int4w-g32-rtn"), ("tflite", "int8da-int4w-g32"), ("onnx", None)]
# Flows whose verdict is FAIL on this host too (a property of the artifact against the bound, not of
# the device), as a strict xfail so the suite says when one starts passing. None today: the
# int8da-int4w-g32 (AWQ) flows failed top-1 (98.8 %) while the reference computed the 8da4w head
# with float activations; since it applies them (tests/test_reference_head_act8.py) the artifacts
# match it to fp32 rounding.
HOST_FAILS: dict[tuple[str, str | None], str] = {}


@pytest.fixture(scope="module")
def emulator():
    return api.device_setup("qemu-arm64")


@pytest.fixture(scope="module")
def compiled(tiny_llama_dir, tmp_path_factory):
    """flow -> its artifact folder, compiled once per module."""
    done = {}

    def get(target, recipe):
        if (target, recipe) not in done:
            out = tmp_path_factory.mktemp(f"{target}-{recipe or 'float'}") / "a"
            api.compile_model(str(tiny_llama_dir), target, None, out, max_seq_len=48, recipe=recipe)
            done[target, recipe] = out
        return done[target, recipe]

    return get


@pytest.mark.emulator
def test_setup_is_cached_and_every_runtime_runs(emulator):
    t = time.time()
    again = api.device_setup("qemu-arm64")
    assert again["cached"] and again["path"] == emulator["path"] and time.time() - t < 5
    # a runtime that could not run would be named here with its reason (and refused by validate)
    assert again["runtimes"] == {"ai_edge_litert": None, "executorch": None, "onnxruntime": None}, again["runtimes"]


@pytest.mark.emulator
@pytest.mark.parametrize("target,recipe", [
    pytest.param(t, r, id=f"{t}-{r or 'float'}", marks=[pytest.mark.xfail(strict=True, reason=HOST_FAILS[t, r])]
                 if (t, r) in HOST_FAILS else []) for t, r in FLOWS])
def test_validate_on_qemu_arm64(emulator, compiled, target, recipe):
    r = api.validate(compiled(target, recipe), api.ValidateOptions(on="qemu-arm64", record=False))
    print(json.dumps({"flow": f"{target}/{recipe or 'float'}", "verdict": r.verdict, "positions": r.positions,
                      "prefill_max_abs": r.prefill_max_abs, "decode_max_abs": r.decode_max_abs,
                      "top1": r.top1_agreement, "mean_kl": r.mean_kl, "delta_ppl": r.delta_ppl, "notes": r.notes}))
    exact = r.tolerance.get("rule") == "exact"
    # float and int8 activations alike: the host's teacher-forced windows (>= 512 positions) ran
    # inside the emulator, judged by host validation's own verdict
    assert r.verdict == "PASS", r
    assert r.positions >= 512 and r.windows >= 1, r
    assert "qemu-arm64" in r.runtime
    host_vs = next(n for n in r.notes if n.startswith("host vs qemu-arm64"))
    diff = float(re.search(r"max \|Δ\| logits (\S+) over (\d+)", host_vs).group(1))
    assert r.host_vs_device["positions"] == r.positions and r.host_vs_device["max_abs"] == pytest.approx(diff, rel=1e-2)
    if exact:  # the same fp32 artifact on two CPUs: summation order only (FLOAT_EXACT)
        assert diff <= 2e-3, host_vs
    if target == "executorch" and exact and (compiled(target, recipe) / "check" / "model.bpte").is_file():
        assert any(re.search(r"BundledProgram verification .*: (\d+)/\1 test cases passed", n) for n in r.notes), r.notes


@pytest.mark.emulator
def test_broken_artifact_fails_on_the_emulator(emulator, compiled, tiny_llama_dir):
    """Control: the emulator's verdict can fail (a model with other weights as the reference)."""
    out = compiled("tflite", None)
    other = api.load(str(tiny_llama_dir), max_seq_len=48)
    for _, w in api.named_weights(other):
        if getattr(w, "data", None) is not None and w.data.ndim == 2:
            w.data.mul_(1.05)
    r = api.validate(out, api.ValidateOptions(on="qemu-arm64", record=False), model=other)
    assert not r.passed


def test_a_runtime_setup_could_not_run_is_refused_with_its_reason(tmp_path, monkeypatch, tiny_llama_dir):
    """No emulator needed: a device whose setup recorded a runtime as failing refuses it."""
    from slmc.device import qemu, validate

    dev = qemu.QemuArm64(root=tmp_path)
    dev.info = {"runtimes": {"ai_edge_litert": "`import ...` fails under qemu-user (exit 1): probe", "executorch": None}}
    monkeypatch.setattr(validate, "get_device", lambda spec: dev)
    manifest = {"target": "tflite", "format": "tflite", "backend": "cpu"}
    model = api.load(str(tiny_llama_dir), max_seq_len=48)
    with pytest.raises(SlmcError, match=r"tflite cannot be validated on qemu-arm64: `import \.\.\.` fails"):
        validate.validate_on(tmp_path, manifest, model, "qemu-arm64")
    manifest = {"target": "coreml", "format": "mlpackage", "backend": "cpu"}
    with pytest.raises(SlmcError, match="XCTest source, run with Xcode"):
        validate.validate_on(tmp_path, manifest, model, "qemu-arm64")


@pytest.mark.slow
@pytest.mark.emulator
def test_smollm2_8da4w_on_qemu_arm64(emulator, tmp_path):
    """The real SmolLM2-135M, int8da-int4w-g32 on ExecuTorch/XNNPACK: the host's teacher-forced
    windows (>= 512 positions) and greedy steps inside the emulator, judged against the host's
    reference under the int8-activation bound; the host-vs-emulator difference is in the notes."""
    out = tmp_path / "smollm2"
    api.compile_model(api.DEFAULT_MODEL, "executorch", "xnnpack", out, max_seq_len=128, recipe="int8da-int4w-g32")
    r = api.validate(out, api.ValidateOptions(on="qemu-arm64", record=False))
    print(json.dumps({"flow": "smollm2-135m executorch/xnnpack int8da-int4w-g32", "passed": r.passed,
                      "prefill_max_abs": r.prefill_max_abs, "decode_max_abs": r.decode_max_abs,
                      "top1": r.top1_agreement, "mean_kl": r.mean_kl, "delta_ppl": r.delta_ppl,
                      "positions": r.positions, "tolerance": r.tolerance, "notes": r.notes}))
    assert r.verdict == "PASS" and r.positions >= 512, r
    assert any(n.startswith("host vs qemu-arm64") for n in r.notes)
