"""A tied embedding/head table is stored once in every target's artifact.

The tiny model's vocabulary is large beside its blocks, so the table is most of its weights.
The check reads the artifact's bytes: the number of places the table's exact byte image
(fp32 row-major, as every target here stores it) occurs. A control compiles the ExecuTorch
artifact with the sharing switched off, which stores the table twice, so the count can fail.
"""

import pytest
import torch

from slmc import api
from slmc.compiler.importers import load_model

VOCAB, HIDDEN = 4096, 64
FLOWS = [("executorch", "xnnpack"), ("tflite", "cpu"), ("coreml", "cpu:precision=fp32,kv=io"), ("onnx", "cpu")]


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    from tiny import save_ascii_tokenizer, save_hf_model

    d = tmp_path_factory.mktemp("tied") / "tied"
    save_hf_model({**api.tiny_llama_config(), "vocab_size": VOCAB, "hidden_size": HIDDEN}, d)
    save_ascii_tokenizer(d, 256)
    return d


def table_bytes(model_dir) -> bytes:
    ir = load_model(model_dir, max_seq_len=32)
    assert ir.lm_head is None  # tied in the IR
    return ir.embed.float().to(torch.float32).contiguous().numpy().tobytes()


def model_files(folder, man) -> list:
    """The files the model itself is (the artifact, a folder's files, ExecuTorch's model.ptd);
    not a second packaging of it such as LiteRT's .litertlm bundle."""
    paths = [folder / man["artifact"]] + ([folder / man["data_file"]] if man.get("data_file") else [])
    return [f for p in paths for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])]


def assert_stored_once(folder, man, table: bytes) -> None:
    """The table's byte image occurs once, and the model's files are one table plus the blocks:
    the weights' bytes, plus less than half a table."""
    assert copies(folder, man, table) == 1
    size = sum(f.stat().st_size for f in model_files(folder, man))
    assert size < man["model"]["weight_bytes"] + len(table) // 2, (size, man["model"]["weight_bytes"])


def copies(folder, man, table: bytes) -> int:
    """How many times the table's byte image occurs in the model's files."""
    return sum(f.read_bytes().count(table) for f in model_files(folder, man))


# ExecuTorch's count runs in the default suite inside the test below (the same compile)
@pytest.mark.parametrize("target,backend", [pytest.param(*f, marks=pytest.mark.slow if f[0] == "executorch" else ())
                                            for f in FLOWS], ids=[f[0] for f in FLOWS])
def test_tied_table_stored_once(tied_dir, tmp_path, target, backend):
    table = table_bytes(tied_dir)
    assert len(table) == VOCAB * HIDDEN * 4
    out, man = api.compile_model(tied_dir, target, backend, tmp_path / target, max_seq_len=32)
    assert_stored_once(out, man, table)


def test_executorch_tied_artifact_runs_and_control_stores_twice(tied_dir, tmp_path, monkeypatch):
    """The .pte + model.ptd pair validates; without the sharing the same count says 2."""
    table = table_bytes(tied_dir)
    out, man = api.compile_model(tied_dir, "executorch", "xnnpack", tmp_path / "et", max_seq_len=32)
    assert man["data_file"] == "model.ptd" and (out / "model.ptd").is_file()
    assert_stored_once(out, man, table)
    assert api.validate_artifact(out, steps=4, record=False).passed
    import slmc.targets.executorch.target as et

    monkeypatch.setattr(et, "tied_table", lambda model, backend: None)
    ctl, man2 = api.compile_model(tied_dir, "executorch", "xnnpack", tmp_path / "control", max_seq_len=32)
    assert "data_file" not in man2 and copies(ctl, man2, table) == 2
