"""The Xcode build phase and the Gradle script, run for real here: the Xcode script with the
environment Xcode gives a Run Script phase (no Xcode on Linux), the Gradle script with Debian's
Gradle (4.4.1 on Java 17; no Android SDK, so a plain project applying it). Tiny model, ONNX
target (the quickest compile), one shared cache: the same artifact spec is one key."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slmc.build.digest import artifact_sha256

ROOT = Path(__file__).resolve().parents[1]

TOML = """
[models.tiny]
path = "{model}"

[platforms.{platform}]
out = "unused"

[[platforms.{platform}.artifacts]]
name = "tiny"
model = "tiny"
target = "onnx"
max_seq_len = 32
validate = false
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def wrapper(tmp: Path, cache: Path) -> Path:
    w = tmp / "slmc"
    w.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} SLMC_CACHE={cache} exec {sys.executable} -m slmc.cli \"$@\"\n")
    w.chmod(0o755)
    return w


def xcode_env(src: Path, app: Path, w: Path) -> dict:
    return {**os.environ, "SRCROOT": str(src), "TARGET_BUILD_DIR": str(app.parent),
            "UNLOCALIZED_RESOURCES_FOLDER_PATH": app.name, "PLATFORM_NAME": "iphoneos",
            "DERIVED_FILE_DIR": str(src / "DerivedSources"), "SLMC": str(w)}


SCRIPT = ROOT / "integrations" / "xcode" / "slmc-build-phase.sh"


def test_xcode_build_phase_puts_the_artifact_in_the_bundle(tiny_llama_dir, tmp_path, cache):
    src, app = tmp_path / "src", tmp_path / "Build" / "Products" / "Debug-iphoneos" / "App.app"
    src.mkdir()
    (src / "slmc.toml").write_text(TOML.format(model=tiny_llama_dir, platform="ios"))
    env = xcode_env(src, app, wrapper(tmp_path, cache))
    p = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    art = app / "tiny"
    assert (art / "model.onnx").is_file() and (art / "manifest.json").is_file() and (art / "tokenizer.json").is_file()
    assert (src / "DerivedSources" / "slmc.stamp").is_file()
    dep = (src / "DerivedSources" / "slmc.d").read_text()
    assert str(tiny_llama_dir / "model.safetensors") in dep and str(src / "slmc.toml") in dep
    lock = json.loads((src / "slmc.lock").read_text())["artifacts"]["ios/tiny"]
    assert lock["sha256"] == artifact_sha256(art)
    again = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "1 up to date" in again.stderr


@pytest.mark.parametrize("unset,platform", [("SRCROOT", "iphoneos"), ("TARGET_BUILD_DIR", "iphoneos"),
                                            (None, "watchos")])
def test_xcode_build_phase_refuses_a_wrong_environment(tmp_path, cache, unset, platform):
    env = xcode_env(tmp_path, tmp_path / "App.app", wrapper(tmp_path, cache))
    env["PLATFORM_NAME"] = platform
    env.pop(unset, None)
    p = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and (unset or platform) in p.stderr
    assert not (tmp_path / "App.app").exists()


def gradle(proj: Path, *args) -> str:
    p = subprocess.run(["gradle", "--no-daemon", "--console=plain", "--offline", *args], cwd=proj,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.mark.slow  # each Gradle 4.4.1 start is ~15 s here
@pytest.mark.skipif(shutil.which("gradle") is None, reason="needs gradle (Debian: apt-get install gradle)")
def test_gradle_script_builds_and_is_up_to_date(tiny_llama_dir, tmp_path, cache):
    proj, model = tmp_path / "app", tmp_path / "model"
    proj.mkdir()
    shutil.copytree(tiny_llama_dir, model)
    (proj / "slmc.toml").write_text(TOML.format(model=model, platform="android"))
    (proj / "settings.gradle").write_text("rootProject.name = 'app'\n")
    (proj / "build.gradle").write_text(f"ext.slmcCommand = '{wrapper(tmp_path, cache)}'\n"
                                       f"apply from: '{ROOT / 'integrations' / 'gradle' / 'slmc.gradle'}'\n")
    assert "1 compiled" in gradle(proj, "slmcBuild")
    art = proj / "build" / "generated" / "slmc" / "assets" / "tiny"
    assert (art / "model.onnx").is_file() and (art / "manifest.json").is_file()
    # second run: the depfile now lists the model files, so Gradle's inputs are new once and
    # slmc answers "up to date"; from the third run Gradle itself skips the task
    assert "1 up to date" in gradle(proj, "slmcBuild")
    assert ":slmcBuild UP-TO-DATE" in gradle(proj, "slmcBuild")
    cfg = json.loads((model / "config.json").read_text())  # a changed model: the task reruns
    cfg["rms_norm_eps"] = 2e-5
    (model / "config.json").write_text(json.dumps(cfg))
    changed = gradle(proj, "slmcBuild")
    assert ":slmcBuild UP-TO-DATE" not in changed and "1 compiled" in changed
