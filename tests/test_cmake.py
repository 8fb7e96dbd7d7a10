"""The CMake adapter for real (Debian's cmake + ninja): examples/cmake builds its model with
`slmc_add_model` and a C++ program on the ExecuTorch runtime from the wheel; the second build
is a no-op, touching slmc.toml or the model reruns `slmc build`, a changed model recompiles,
and the program's greedy ids equal ExecuTorch's Python runtime on the same .pte."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,  # two slmc compiles and a C++ build: minutes on a loaded 2-core machine
    pytest.mark.skipif(not all(shutil.which(t) for t in ("cmake", "ninja", "c++")), reason="needs cmake, ninja, c++"),
]

TOML = """
[models.tiny]
path = "{model}"

[platforms.host]
out = "models"

[[platforms.host.artifacts]]
name = "chat"
model = "tiny"
target = "executorch"
backend = "xnnpack"
max_seq_len = 64
"""


def ninja(build: Path) -> str:
    p = subprocess.run(["ninja", "-C", str(build)], capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def python_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    from slmc.manifest import read_manifest
    from slmc.targets import target_of

    man = read_manifest(folder)
    sess = target_of(man).open_session(folder, man)
    out, pos, toks = [], 0, list(ids)
    for _ in range(n):
        nxt = int(sess.step(toks, pos).argmax())
        pos += len(toks)
        out.append(nxt)
        toks = [nxt]
    return out


def test_cmake_example_builds_runs_and_tracks_inputs(tiny_llama_dir, tmp_path):
    src, build, model = tmp_path / "src", tmp_path / "build", tmp_path / "model"
    shutil.copytree(ROOT / "examples" / "cmake", src)
    shutil.copytree(tiny_llama_dir, model)
    (src / "slmc.toml").write_text(TOML.format(model=model))
    wrapper = tmp_path / "slmc"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} SLMC_CACHE={tmp_path / 'cache'} "
                       f"exec {sys.executable} -m slmc.cli \"$@\"\n")
    wrapper.chmod(0o755)
    et = list(importlib.util.find_spec("executorch").submodule_search_locations)[0]
    p = subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", f"-DSLMC_COMMAND={wrapper}",
                        f"-DSLMC_CMAKE_DIR={ROOT / 'integrations' / 'cmake'}", f"-DCMAKE_PREFIX_PATH={et}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    first = ninja(build)
    assert "slmc build --platform host" in first and "Linking CXX executable generate" in first
    art = src / "models" / "chat"
    lock = json.loads((src / "slmc.lock").read_text())["artifacts"]["host/chat"]
    assert (art / "model.pte").is_file()
    assert "ninja: no work to do" in ninja(build)  # second build: nothing runs

    (src / "slmc.toml").touch()  # touched config: slmc build reruns, finds it up to date
    assert "slmc build --platform host" in ninja(build)
    assert json.loads((src / "slmc.lock").read_text())["artifacts"]["host/chat"] == lock
    (model / "model.safetensors").touch()  # touched model (the depfile lists it): reruns too
    assert "slmc build --platform host" in ninja(build)
    assert "ninja: no work to do" in ninja(build)

    # the C++ program: greedy ids from the built .pte, equal to ExecuTorch's Python runtime
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(art / "tokenizer.json"))
    ids = tok.encode("hello world").ids
    run = subprocess.run([str(build / "generate"), str(art / "model.pte"), "12", *map(str, ids)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = [int(x) for x in run.stdout.split()]
    assert len(got) == 12 and got == python_greedy(art, ids, 12)
    assert tok.decode(got)  # printable text (the tiny model's tokens are ASCII)
    # control: a corrupted program is refused by the runtime, not run
    bad = tmp_path / "bad.pte"
    data = bytearray((art / "model.pte").read_bytes())
    data[4:8] = b"XXXX"  # the flatbuffer file identifier
    bad.write_bytes(bytes(data))
    assert subprocess.run([str(build / "generate"), str(bad), "2", "1"], capture_output=True).returncode != 0

    # a changed model (one config value): recompiled, new key in slmc.lock
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = 2e-5
    (model / "config.json").write_text(json.dumps(cfg))
    out = ninja(build)
    assert "host/chat: compiled" in out
    new = json.loads((src / "slmc.lock").read_text())["artifacts"]["host/chat"]
    assert new["key"] != lock["key"] and new["model_sha256"] != lock["model_sha256"]
