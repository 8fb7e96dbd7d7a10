"""`slmc build`: slmc.toml validation, the shared cache (hit, miss, no-op, concurrent, killed),
slmc.lock and the depfile. Tiny models, the ONNX target (the quickest compile), every cache and
output in tmp dirs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmc.build.cache import Cache
from slmc.build.config import parse
from slmc.build.digest import artifact_sha256, tree_sha256
from slmc.errors import SlmcError

ROOT = Path(__file__).resolve().parents[1]

TOML = """
[models.a]
path = "{a}"

[models.b]
path = "{b}"

[platforms.android]
out = "out/android"

[[platforms.android.artifacts]]
name = "a-onnx"
model = "a"
target = "onnx"
max_seq_len = 32
validate = true

[platforms.host]
out = "out/host"

[[platforms.host.artifacts]]
name = "b-onnx"
model = "b"
target = "onnx"
max_seq_len = {msl}
kv = {{ dtype = "float32" }}
validate = false
"""


def slmc(*args, cwd, cache, check=True, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLMC_CACHE": str(cache)}
    p = subprocess.run([sys.executable, "-m", "slmc.cli", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def build_json(cwd, cache, *args):
    p = slmc("build", "--json", *args, cwd=cwd, cache=cache)
    return {a["id"]: a for a in json.loads(p.stdout)["artifacts"]}


def write_project(d: Path, a: Path, b: Path, msl: int = 32) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "slmc.toml").write_text(TOML.format(a=a, b=b, msl=msl))
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny import save_ascii_tokenizer, save_hf_model

    from slmc.compiler.families.llama import tiny_config

    out = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"model{seed}")
        save_hf_model(tiny_config(), d, seed=seed)
        save_ascii_tokenizer(d)
        out.append(d)
    return out


@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    """One project built once (two platforms, two models): what the other tests start from."""
    cache = tmp_path_factory.mktemp("cache")
    proj = write_project(tmp_path_factory.mktemp("proj"), *models)
    first = build_json(proj, cache, "--jobs", "2")  # two misses: compiled in two worker processes
    return proj, cache, first


# --- slmc.toml validation: one line naming the key, exit 2 ---------------------------------

BAD = [
    ("[models.a]\npath='x'\ncolour=1\n[platforms.host]\nout='o'\n", "slmc.toml: models.a.colour: unknown key"),
    ("[models.a]\npath='x'\n[platforms.desktop]\nout='o'\n", "slmc.toml: platforms.desktop: unknown platform"),
    ("[models.a]\npath='x'\n[platforms.host]\nout='o'\n[[platforms.host.artifacts]]\nname='n'\nmodel='a'\n"
     "target='tensorrt'\n", "slmc.toml: platforms.host.artifacts[0].target: unknown target 'tensorrt'"),
    ("[models.a]\npath='x'\n[platforms.host]\nout='o'\n[[platforms.host.artifacts]]\nname='n'\nmodel='zz'\n"
     "target='onnx'\n", "slmc.toml: platforms.host.artifacts[0].model: 'zz' is not a key of [models]"),
    ("[models.a]\npath='x'\n[platforms.host]\nout='o'\n[[platforms.host.artifacts]]\nname='n'\nmodel='a'\n"
     "target='onnx'\nmax_seq_len='long'\n", "slmc.toml: platforms.host.artifacts[0].max_seq_len: must be an integer"),
    ("[models.a]\npath='x'\n[platforms.host]\nout='o'\n[[platforms.host.artifacts]]\nname='n'\nmodel='a'\n"
     "target='onnx'\nkv={depth=3}\n", "slmc.toml: platforms.host.artifacts[0].kv.depth: unknown key"),
    ("[models.a]\npath='x'\n[platforms.host]\nout='o'\n[[platforms.host.artifacts]]\nname='n'\nmodel='a'\n"
     "target='executorch'\nbackend='xnnpack'\nrecipe='int8-coreml'\n",
     "slmc.toml: platforms.host.artifacts[0].recipe: int8-coreml is built for coreml"),
    ("[models.a]\npath='x'\nsha256='abc'\n[platforms.host]\nout='o'\n", "slmc.toml: models.a.sha256: must be 64"),
    ("[models.a]\n[platforms.host]\nout='o'\n", "slmc.toml: models.a.path: missing"),
    ("[models.a]\npath='x'\n[platforms.host]\nout='o'\nartifacts=[]\n", "slmc.toml: platforms.host.artifacts: empty"),
    ("models = 3\n", "slmc.toml: models: must be a table"),
    ("[models.a\n", "slmc.toml: not valid TOML"),
]


@pytest.mark.parametrize("text,msg", BAD, ids=range(len(BAD)))
def test_config_errors_name_the_key(tmp_path, text, msg):
    with pytest.raises(SlmcError) as e:
        parse(text, tmp_path / "slmc.toml")
    assert str(e.value).startswith(msg), str(e.value)


def test_config_error_cli_one_line_exit_2(tmp_path):
    (tmp_path / "slmc.toml").write_text(BAD[0][0])
    p = slmc("build", cwd=tmp_path, cache=tmp_path / "c", check=False)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "models.a.colour: unknown key" in p.stderr


def test_valid_config_parses(models, tmp_path):
    cfg = parse(TOML.format(a=models[0], b=models[1], msl=32), tmp_path / "slmc.toml")
    assert set(cfg.platforms) == {"android", "host"}
    art = cfg.platforms["host"].artifacts[0]
    assert art.kv.dtype == "float32" and art.kv.pass_spec() == "kv.cache:dtype=float32" and not art.validate


# --- building ------------------------------------------------------------------------------

def test_first_build_compiles_and_writes_lock_and_depfile(built, models):
    proj, cache, first = built
    assert {k: v["status"] for k, v in first.items()} == {"android/a-onnx": "compiled", "host/b-onnx": "compiled"}
    lock = json.loads((proj / "slmc.lock").read_text())["artifacts"]
    for id_, a in first.items():
        out = Path(a["out"])
        assert (out / "manifest.json").is_file() and (out / "model.onnx").is_file()
        assert lock[id_]["key"] == a["key"] and lock[id_]["sha256"] == artifact_sha256(out)
        assert (Cache(cache / "build").object(a["key"]) / "manifest.json").is_file()
    assert lock["android/a-onnx"]["model_sha256"] == tree_sha256(models[0])
    # the validated artifact carries its report; the other was not validated
    assert json.loads((proj / "out/android/a-onnx/manifest.json").read_text())["validation"]["passed"]
    assert json.loads((proj / "out/host/b-onnx/manifest.json").read_text()).get("validation") is None
    dep = (proj / "slmc.d").read_text()
    head, _, rest = dep.partition(":")
    assert head == str(proj / "slmc.lock")
    deps = [x.strip(" \\") for x in rest.split("\n") if x.strip(" \\")]
    assert str(proj / "slmc.toml") in deps
    assert {str(models[i] / "model.safetensors") for i in (0, 1)} <= set(deps)


def test_second_build_is_a_noop_under_2s(built):
    proj, cache, first = built
    t0 = time.monotonic()
    second = build_json(proj, cache)
    elapsed = time.monotonic() - t0
    assert {v["status"] for v in second.values()} == {"up to date"}
    assert elapsed < 2.0, f"no-op build took {elapsed:.2f} s"
    # control: an edited output is noticed (its digest no longer matches slmc.lock) and restored
    onnx = Path(first["host/b-onnx"]["out"]) / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"x")
    third = build_json(proj, cache)
    assert third["host/b-onnx"]["status"] == "cache hit" and third["android/a-onnx"]["status"] == "up to date"
    assert artifact_sha256(onnx.parent) == first["host/b-onnx"]["sha256"]


def test_changed_input_rebuilds_only_dependents(built, models, tmp_path):
    proj, cache, first = built
    # a copy of model b with one weight changed: only the host artifact depends on it
    import shutil

    b2 = tmp_path / "b2"
    shutil.copytree(models[1], b2)
    cfg = json.loads((b2 / "config.json").read_text())
    cfg["rms_norm_eps"] = 2e-5
    (b2 / "config.json").write_text(json.dumps(cfg))
    proj2 = write_project(tmp_path / "proj", models[0], b2)
    res = build_json(proj2, cache)
    assert res["android/a-onnx"]["status"] == "cache hit"  # same key as the first project's: copied
    assert res["host/b-onnx"]["status"] == "compiled"
    assert res["host/b-onnx"]["key"] != first["host/b-onnx"]["key"]
    assert res["android/a-onnx"]["key"] == first["android/a-onnx"]["key"]
    # --platform builds only that platform
    (proj2 / "slmc.toml").write_text((proj2 / "slmc.toml").read_text().replace('max_seq_len = 32\nvalidate = true',
                                                                                'max_seq_len = 24\nvalidate = true'))
    only = build_json(proj2, cache, "--platform", "host")
    assert list(only) == ["host/b-onnx"] and only["host/b-onnx"]["status"] == "up to date"


def test_model_pin_mismatch_fails(built, models, tmp_path):
    proj = write_project(tmp_path / "p", *models)
    text = (proj / "slmc.toml").read_text().replace(f'path = "{models[0]}"', f'path = "{models[0]}"\nsha256 = "{"0" * 64}"')
    (proj / "slmc.toml").write_text(text)
    p = slmc("build", cwd=proj, cache=built[1], check=False)
    assert p.returncode == 2 and "models.a.sha256: the model's files have sha256" in p.stderr
    (proj / "slmc.toml").write_text(text.replace("0" * 64, tree_sha256(models[0])))
    assert slmc("build", cwd=proj, cache=built[1], check=False).returncode == 0


def test_concurrent_builds_share_the_cache(built, models, tmp_path):
    """Two projects, two processes, one cache, the same new key: one compiles, the other waits
    on the key's lock and copies; both outputs are whole and identical."""
    _, cache, _ = built
    projs = [write_project(tmp_path / f"p{i}", *models, msl=40) for i in (0, 1)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLMC_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-m", "slmc.cli", "build", "--json", "--platform", "host"], cwd=p,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in projs]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out)["artifacts"][0])
    statuses = sorted(r["status"] for r in results)
    assert statuses in (["cache hit", "compiled"], ["compiled", "waited for another build"]), statuses
    assert results[0]["key"] == results[1]["key"] and results[0]["sha256"] == results[1]["sha256"]
    objects = Cache(cache / "build").root / "objects"
    assert (objects / results[0]["key"] / "model.onnx").is_file()
    assert not list((Cache(cache / "build").root / "tmp").glob(f"{results[0]['key']}.*"))
    for p in projs:
        assert artifact_sha256(p / "out/host/b-onnx") == results[0]["sha256"]


def test_killed_build_leaves_no_partial_artifact(built, models, tmp_path):
    _, cache, _ = built
    proj = write_project(tmp_path / "p", *models, msl=48)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLMC_CACHE": str(cache)}
    tmpdir = cache / "build" / "tmp"
    before = set(tmpdir.iterdir())
    p = subprocess.Popen([sys.executable, "-m", "slmc.cli", "build", "--platform", "host"], cwd=proj, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (set(tmpdir.iterdir()) - before):
        assert p.poll() is None, "the build ended before it started compiling"
        time.sleep(0.2)
    stage = (set(tmpdir.iterdir()) - before).pop()
    time.sleep(3)  # well into the compile (importing, exporting): kill it there
    assert p.poll() is None, "the build ended before it could be killed mid-compile"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    key = stage.name.split(".")[0]
    assert not (cache / "build" / "objects" / key).exists()
    out = proj / "out" / "host"
    assert not (out / "b-onnx").exists()
    assert not [x for x in (out.iterdir() if out.exists() else []) if not x.name.startswith(".")]
    assert not (proj / "slmc.lock").exists()
    # the next build of that key (holding its lock) sweeps the killed build's staging folder
    c = Cache(cache / "build")
    with c.lock(key):
        fresh = c.staging(key)
    assert not stage.exists() and fresh.exists()
