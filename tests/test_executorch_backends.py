"""ExecuTorch backends beyond XNNPACK: what compiles here, what says why it can't."""

import json

import pytest
from click.testing import CliRunner

from slmc.cli import main
from slmc.targets.executorch.backends import BACKENDS


def _compile(model, out, backend):
    return CliRunner().invoke(main, ["compile", str(model), "-o", str(out), "--backend", backend,
                                     "--max-seq-len", "32"])


# Vulkan's partitioning (~75 s on the CI machine) with the slow suite; the Core ML delegate keeps the
# "compiles, cannot run here" check in the default suite
@pytest.mark.parametrize("backend", [pytest.param("vulkan", marks=pytest.mark.slow), "coreml"])
def test_device_only_backends_compile_and_say_they_cannot_run_here(backend, tiny_llama_dir, tmp_path):
    out = tmp_path / backend
    res = _compile(tiny_llama_dir, out, backend)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == backend and not m["host_runnable"]
    assert m["delegation"]["delegate_calls"] >= 1  # the backend really took part of the graph
    assert m["runner"]["metadata_methods"]["enable_dynamic_shape"] == BACKENDS[backend].dynamic
    res = CliRunner().invoke(main, ["validate", str(out)])
    assert res.exit_code == 2 and "cannot run on this host" in res.output


@pytest.mark.parametrize("backend", ["qnn", "mediatek"])
def test_npu_backends_without_sdk_are_refused_with_instructions(backend, tiny_llama_dir, tmp_path, monkeypatch):
    if backend == "qnn":
        monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    why = BACKENDS[backend].missing()
    if why is None:
        pytest.skip(f"the {backend} SDK is installed here; the refusal path cannot be exercised")
    res = _compile(tiny_llama_dir, tmp_path / "out", backend)
    assert res.exit_code == 2 and not (tmp_path / "out").exists()
    assert ("QNN_SDK_ROOT" if backend == "qnn" else "mtk_converter") in res.output


@pytest.mark.parametrize("backend", ["qnn", "mediatek"])
def test_npu_backends_compile_when_their_sdk_is_present(backend, tiny_llama_dir, tmp_path):
    why = BACKENDS[backend].missing()
    if why:
        pytest.skip(why)
    res = _compile(tiny_llama_dir, tmp_path / "out", backend)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["delegation"]["delegate_calls"] >= 1
