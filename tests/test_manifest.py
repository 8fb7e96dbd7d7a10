"""The manifest: one typed, versioned writer (slmc/manifest.py), a JSON schema shipped in
the package, and readers that accept what older slmc wrote."""

import dataclasses
import json
from importlib import resources

import pytest

from slmc import manifest
from slmc.errors import SlmcError
from slmc.manifest import Manifest, schema, schema_errors


@pytest.fixture(scope="module")
def compiled(tiny_et_8da4w, tmp_path_factory):
    """conftest's shared tiny ExecuTorch 8da4w artifact (this module's copy) and the manifest
    that api.compile returned for it."""
    path, _ = tiny_et_8da4w(tmp_path_factory.mktemp("man") / "art")
    return path, tiny_et_8da4w.returned


def test_written_manifest_validates_against_the_shipped_schema(compiled):
    path, m = compiled
    on_disk = json.loads((path / "manifest.json").read_text())
    assert on_disk == m  # what compile returned is what it wrote
    assert schema_errors(on_disk) == []
    # the fields every runtime reads stay at the top level, beside the target's own
    assert on_disk["slmc_manifest"] == manifest.VERSION and on_disk["format"] == "pte"
    assert {"io", "kv_cache", "runner", "files", "model", "kv_cache_spec", "quantization"} <= set(on_disk)
    assert on_disk["recipe"] == "int8da-int4w-g32-rtn" and on_disk["quantization"]["schemes"]
    assert on_disk["files"]["model.pte"] == (path / "model.pte").stat().st_size


def test_typed_round_trip(compiled):
    path, m = compiled
    typed = manifest.load(path)
    assert typed.target == "executorch" and typed.backend == "xnnpack" and "io" in typed.details
    assert typed.to_json() == m
    assert (path / "manifest.json").read_text() == typed.dumps()


def test_schema_is_shipped_and_matches_the_dataclass():
    text = (resources.files("slmc") / "manifest.schema.json").read_text()
    s = json.loads(text)
    fields = {f.name for f in dataclasses.fields(Manifest)} - {"details"}
    assert set(s["required"]) == fields == set(s["properties"])


def test_schema_check_finds_wrong_and_missing_fields(compiled):
    _, m = compiled
    bad = {**m, "compile_seconds": "fast", "model": {**m["model"], "params": 1.5}}
    del bad["files"]
    errs = schema_errors(bad)
    assert any("compile_seconds" in e for e in errs) and any("params" in e for e in errs)
    assert any("'files'" in e for e in errs)
    assert schema_errors({**m, "quantization": None, "tokenizer": None, "recipe": None}) == []
    assert schema_errors({**m, "slmc_manifest": True})  # a bool is not an integer


def test_writer_refuses_a_manifest_its_schema_refuses(compiled, tmp_path):
    _, m = compiled
    bad = dataclasses.replace(Manifest.from_json(m), compile_seconds="fast")
    with pytest.raises(AssertionError, match="compile_seconds"):
        manifest.write_manifest(tmp_path, bad, [], [])
    assert not (tmp_path / "manifest.json").exists()


def test_reader_accepts_older_manifests_and_refuses_newer():
    old = {"format": "pte", "artifact": "model.pte", "target": "executorch", "backend": "xnnpack",
           "io": {"forward": {}}, "files": {"model.pte": 10}}  # before versions, pipelines, recipes
    m = Manifest.from_json(old)
    assert m.recipe is None and m.calibration_files == [] and m.validation is None and m.pipeline == []
    assert m.details == {"io": {"forward": {}}} and m.slmc_manifest == manifest.VERSION
    with pytest.raises(SlmcError, match="newer"):
        Manifest.from_json({**old, "slmc_manifest": manifest.VERSION + 1})
    with pytest.raises(SlmcError, match="no artifact"):
        Manifest.from_json({"format": "pte"})


def test_recorded_validation_keeps_every_other_byte(compiled, tmp_path):
    path, m = compiled
    (tmp_path / "manifest.json").write_text((path / "manifest.json").read_text())
    out = manifest.record_validation(tmp_path, {"passed": True})
    assert out == {**m, "validation": {"passed": True}}
    assert (tmp_path / "manifest.json").read_text() == json.dumps(out, indent=2, sort_keys=True) + "\n"
    assert schema()["properties"]["validation"]["type"] == ["object", "null"]
