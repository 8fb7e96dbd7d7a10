"""The on-device check bundle (`check/` in every artifact folder) and the device transports,
on this host: the bundle exists and leaves the model files alone, its checker passes here,
and it fails on broken inputs (tampered expected outputs, a tampered artifact, a wrong
reference, a BundledProgram with wrong expected outputs); adb without a phone is one error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slmc import api
from slmc.errors import SlmcError

# key -> (target, backend, recipe): XNNPACK fp32 keeps its tied table in model.ptd (no .bpte: ExecuTorch's
# BundledModule cannot attach external data), so the BundledProgram is checked on the portable flow
# (an elementwise check needs the exact rule; int8-activation flows have a statistical bound)
FLOWS = {"executorch": ("executorch", "portable", None), "executorch-ptd": ("executorch", "xnnpack", None),
         "tflite": ("tflite", None, None)}


@pytest.fixture(scope="module")
def artifacts(tiny_llama_dir, tmp_path_factory):
    out = {}
    for key, (target, backend, recipe) in FLOWS.items():
        d = tmp_path_factory.mktemp(f"bundle-{key}") / "a"
        api.compile_model(str(tiny_llama_dir), target, backend, d, max_seq_len=48, recipe=recipe)
        out[key] = d
    return out


def bounds_names(folder: Path) -> set[str]:
    return set(json.loads((folder / "check" / "bounds.json").read_text())["sha256"])


def run_checker(folder: Path) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, str(folder / "check" / "check.py"), str(folder / "result.npz")],
                       capture_output=True, text=True, timeout=600)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    return r.returncode, json.loads(lines[-1]) if lines else {"stderr": r.stderr[-2000:]}


@pytest.mark.parametrize("target", list(FLOWS))
def test_bundle_is_in_the_folder_and_the_manifest(artifacts, target):
    folder = artifacts[target]
    m = api.read_manifest(folder)
    names = {"check/expected.npz", "check/bounds.json", "check/judge.py", "check/common.py", "check/check.py"}
    if target == "executorch":
        names.add("check/model.bpte")
    assert names <= set(m["files"]), sorted(m["files"])
    if target == "executorch-ptd":
        assert m["data_file"] in bounds_names(folder) and "check/model.bpte" not in m["files"]
    bounds = json.loads((folder / "check" / "bounds.json").read_text())
    # the hashes were taken from the lowered bytes before anything was written: the model
    # files on disk are exactly those bytes
    assert m["artifact"] in bounds["sha256"]
    for name, sha in bounds["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha
    with np.load(folder / "check" / "expected.npz") as exp:
        assert exp["logits"].shape == (len(exp["tokens"]), m["model"]["vocab_size"]) and len(exp["prompt"]) >= 1


@pytest.mark.parametrize("target", list(FLOWS))
def test_checker_passes_on_host_and_validate_on_host(artifacts, target):
    rc, report = run_checker(artifacts[target])
    assert rc == 0 and report["passed"], report
    if target == "executorch":  # ExecuTorch's own BundledProgram check ran every case
        assert report["bundled_program_verified"] == [True] * report["steps"]
    r = api.validate(artifacts[target], api.ValidateOptions(on="host", record=False))
    assert r.passed and r.runtime.endswith("on host"), r


@pytest.mark.parametrize("target", list(FLOWS))
def test_tampered_expected_outputs_fail_the_checker(artifacts, target, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(artifacts[target], folder)
    with np.load(folder / "check" / "expected.npz") as exp:
        arrays = {k: exp[k].copy() for k in exp.files}
    arrays["logits"][2] += 0.5  # one decode step's expected logits moved past any bound here
    np.savez(folder / "check" / "expected.npz", **arrays)
    rc, report = run_checker(folder)
    assert rc == 1 and not report["passed"] and report["decode_max_abs"] > 0.4, report


@pytest.mark.parametrize("target", list(FLOWS))
def test_tampered_artifact_fails(artifacts, target, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(artifacts[target], folder)
    path = folder / api.read_manifest(folder)["artifact"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    rc, report = run_checker(folder)
    assert rc == 1 and "differs from the compiled artifact" in report.get("error", ""), report
    with pytest.raises(SlmcError, match="differs from the compiled artifact"):
        api.validate(folder, api.ValidateOptions(on="host", record=False))


def test_wrong_reference_fails_on_the_host_side(artifacts, tiny_llama_dir):
    """The host judges the device's outputs against its own reference: another model fails."""
    folder = artifacts["tflite"]
    other = api.load(str(tiny_llama_dir), max_seq_len=48)
    for _, w in api.named_weights(other):
        if getattr(w, "data", None) is not None and w.data.ndim == 2:
            w.data.mul_(1.05)
    r = api.validate(folder, api.ValidateOptions(on="host", record=False), model=other)
    assert not r.passed and r.prefill_max_abs > 2e-3


def test_executorch_bundled_program_verification_can_fail(artifacts):
    """ExecuTorch's own verification rejects a BundledProgram whose expected outputs are off."""
    import executorch.kernels.quantized  # noqa: F401  the 8da4w program's quantized kernels
    import torch  # noqa: F401  libtorch for the pybindings
    from executorch.extension.pybindings import _C as et

    from slmc.targets.executorch.check import bundled_program

    folder = artifacts["executorch"]
    with np.load(folder / "check" / "expected.npz") as exp:
        prompt, tokens, logits = exp["prompt"].tolist(), exp["tokens"].tolist(), exp["logits"].copy()
    pte = (folder / "model.pte").read_bytes()
    atol = json.loads((folder / "check" / "bounds.json").read_text())["max_abs"]  # the flow's bound
    assert atol < 0.5
    for shift, ok in ((0.0, True), (0.5, False)):
        bundle = et._load_bundled_program_from_buffer(bundled_program(pte, prompt, tokens, logits + shift))
        results = []
        for i in range(len(tokens)):
            try:
                bundle.verify_result_with_bundled_expected_output("forward", i, rtol=0.0, atol=atol)
                results.append(True)
            except RuntimeError:
                results.append(False)
        assert results == [ok] * len(tokens), (shift, results)


def test_coreml_bundle_is_an_xctest_source():
    from slmc.device.bundle import CheckData
    from slmc.targets.coreml.check import check_bundle

    io = {"prefill": {"inputs": [{"name": "inputIds", "dtype": "int32"}, {"name": "causalMask", "dtype": "float16"}],
                      "states": [{"name": "keyCache", "shape": [2, 1, 2, 48, 8], "dtype": "float16"},
                                 {"name": "valueCache", "shape": [2, 1, 2, 48, 8], "dtype": "float16"}]},
          "decode": {}}
    manifest = {"artifact": "model.mlpackage", "io": io, "default_function": "prefill", "kv_cache": {"kind": "states"}}
    data = CheckData([1, 2, 3], [4, 5], np.arange(2 * 7, dtype=np.float32).reshape(2, 7),
                     {"max_abs": 0.05, "min_top1": 0.97, "greedy_equal": False, "notes": []})
    files = check_bundle(None, manifest, data)
    swift = files["SlmcCheckTests.swift"].decode()
    assert "final class SlmcCheckTests: XCTestCase" in swift and "let tokens: [Int32] = [4, 5]" in swift
    assert "let hasDecode = true" in swift and "let stateful = true" in swift and "let vocab = 7" in swift
    assert np.frombuffer(files["expected_logits.f32"], "<f4").tolist() == data.expected.reshape(-1).tolist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_adb_without_a_device_is_one_clear_error(monkeypatch):
    from slmc.device import get_device

    if shutil.which("adb") is None:
        with pytest.raises(SlmcError, match="adb is not installed"):
            get_device("adb")
        return
    # a private adb server on a free local port, stopped afterwards (never the user's server)
    port = str(_free_port())
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", port)
    try:
        with pytest.raises(SlmcError, match="no Android device is connected"):
            get_device("adb")
        with pytest.raises(SlmcError, match="no Android device is connected"):
            get_device("adb:emulator-5554")
    finally:
        subprocess.run(["adb", "-P", port, "kill-server"], capture_output=True, timeout=60,
                       env={**os.environ, "ANDROID_ADB_SERVER_PORT": port})


def test_unknown_device_and_missing_emulator_are_errors(monkeypatch, tmp_path):
    from slmc.device import get_device

    with pytest.raises(SlmcError, match="unknown device 'pixel'"):
        get_device("pixel")
    monkeypatch.setenv("SLMC_CACHE", str(tmp_path))
    with pytest.raises(SlmcError, match="not set up here; run `slmc device setup qemu-arm64`"):
        get_device("qemu-arm64")
