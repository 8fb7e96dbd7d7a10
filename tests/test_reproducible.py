"""Same inputs, same bytes: each target compiled twice, in two fresh processes (so nothing is
shared through memory, caches or id()-ordering), gives the same sha256 for every file; the
manifest is compared by its stable fields (slmc/build/digest.py keeps timings and host paths
apart). The second compile keeps torch.fx's per-node source traces, which slmc drops while
lowering (_api/compile.untraced_sources): dropping them changes no byte. A control shows the
comparison sees a one-byte change."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmc._api.compile import KEEP_TRACES_ENV
from slmc.build.digest import artifact_sha256, file_digests, stable_manifest

ROOT = Path(__file__).resolve().parents[1]

# Targets with a file known to differ between identical compiles (compared out, with the reason
# here). None now: Core ML's model.mlmodel differed (coremltools picked among equal broadcast
# symbols in set order, and protobuf wrote map fields in hash order) until targets/coreml/
# target.py made both stable.
NOT_REPRODUCIBLE: dict[str, set] = {}

FLOWS = [("executorch", "xnnpack"), ("tflite", "cpu"), ("coreml", "all"), ("onnx", "cpu")]


def _compile_twice(model: Path, target: str, backend: str, tmp: Path) -> list[Path]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outs = [tmp / f"{target}-{i}" for i in (1, 2)]
    envs = [env, {**env, KEEP_TRACES_ENV: "1"}]
    procs = [subprocess.Popen([sys.executable, "-m", "slmc.cli", "compile", str(model), "-t", target, "-b", backend,
                               "--max-seq-len", "32", "-o", str(o)], env=e, cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for o, e in zip(outs, envs)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-2000:]
    return outs


@pytest.mark.slow  # two compiles per target: 20 s idle, minutes on a loaded 2-core machine
@pytest.mark.parametrize("target,backend", FLOWS, ids=[f[0] for f in FLOWS])
def test_byte_identical_rebuild(tiny_llama_dir, tmp_path, target, backend):
    a, b = _compile_twice(tiny_llama_dir, target, backend, tmp_path)
    da, db = file_digests(a), file_digests(b)
    assert da.keys() == db.keys()
    skip = NOT_REPRODUCIBLE.get(target, set())
    if skip:  # the manifest lists each file's size: the known-different file's is compared out
        ma, mb = (stable_manifest(json.loads((d / "manifest.json").read_text())) for d in (a, b))
        for m in (ma, mb):
            for name in skip:
                m["files"].pop(name)
        assert ma == mb
        skip = skip | {"manifest.json (stable fields)"}
    differ = sorted(k for k in da if da[k] != db[k] and k not in skip)
    assert not differ, f"{target}: files differ between identical compiles: {differ}"
    if not skip:
        assert artifact_sha256(a) == artifact_sha256(b)
    # control: the comparison sees a one-byte change in the main artifact file
    main = next(k for k in sorted(da) if not k.startswith("manifest") and k not in skip and
                k.rsplit(".", 1)[-1] in ("pte", "tflite", "bin", "onnx", "data"))
    path = b / main
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    assert file_digests(b)[main] != da[main]
    assert artifact_sha256(b) != artifact_sha256(a)
