"""`slmc validate --by-block --on qemu-arm64`: the block-isolated check (runtime_tests/isolated.py)
with the artifact's debug program run inside the arm64 emulator (device/by_block.py), judged on
the host by the same function as host `--by-block`. Tiny ExecuTorch and LiteRT artifacts, float
and 8da4w, PASS, with the host-vs-emulator difference of the states reported; a KV write shifted
in the lowering (artifact and debug program alike) FAILs at block 0 on the device too.

Marker `emulator`: needs `slmc device setup qemu-arm64` (cached; `make emulator`); without it
these fail with setup's one-line reason, never skipped."""

from __future__ import annotations

import pytest
from test_broken_artifacts import shifted_kv_writes

from slmc import api
from slmc.runtime_tests import isolated

ON = "qemu-arm64"


@pytest.fixture(scope="module")
def emulator():
    return api.device_setup(ON)


def _show(r) -> None:
    print(f"{r.artifact} on {r.runtime}: {r.verdict}; {r.notes}")
    for s in r.stages:
        print(f"  {s['stage']:>10}  rel {s['rel']:.3g}  max|Δ| {s['max_abs']:.3g}  floor {s['floor']:.3g}")


@pytest.mark.emulator
@pytest.mark.parametrize("target,recipe,bound", [
    ("executorch", None, isolated.ISO_FLOAT32), ("executorch", "int8da-int4w-g32", isolated.ISO_ACT8),
    ("tflite", None, isolated.ISO_FLOAT32), ("tflite", "int8da-int4w-g32", isolated.ISO_ACT8)])
def test_by_block_on_emulator_passes(target, recipe, bound, emulator, tiny_llama_dir, tmp_path):
    out = tmp_path / "a"
    api.compile_model(str(tiny_llama_dir), target, None, out, max_seq_len=48, recipe=recipe)
    r = api.validate_by_block(out, api.ValidateOptions(on=ON))
    _show(r)
    runtime = {"executorch": "executorch", "tflite": "ai_edge_litert"}[target]
    assert r.runtime.startswith(f"{runtime} on {ON}") and r.bound == bound
    assert r.artifact_check["matches"] and "both on qemu-arm64" in r.artifact_check["what"], r.to_json()
    assert r.verdict == "PASS" and r.passed, r.to_json()
    hv = r.host_vs_device
    assert hv is not None and hv["device"] == ON and len(hv["stages"]) == len(r.stages), r.to_json()
    assert hv["max_rel_rms"] <= bound, r.to_json()  # the same program on two CPUs: within the flow's rounding


@pytest.mark.emulator
def test_by_block_on_emulator_fails_a_shifted_kv_write(emulator, tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "kv"
    shifted_kv_writes(monkeypatch)  # the artifact and the debug program the host compiles for the device
    api.compile_model(str(tiny_llama_dir), "executorch", "xnnpack", out, max_seq_len=48,
                      recipe="int8da-int4w-g32-rtn")
    r = api.validate_by_block(out, api.ValidateOptions(on=ON))
    _show(r)
    assert r.artifact_check["matches"], r.to_json()
    assert r.verdict == "FAIL" and r.first_past == "block 0", r.to_json()


def test_by_block_on_refuses_other_targets(tiny_llama_dir, tmp_path):
    """ONNX's debug variant has no device script: one line, before any device is touched."""
    from slmc.errors import SlmcError

    out = tmp_path / "onnx"
    api.compile_model(str(tiny_llama_dir), "onnx", None, out, max_seq_len=16)
    with pytest.raises(SlmcError, match="LiteRT .tflite artifacts only"):
        api.validate_by_block(out, api.ValidateOptions(on=ON))
