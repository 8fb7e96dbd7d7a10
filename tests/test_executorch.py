"""The ExecuTorch artifact: runner conventions, manifest, the stock runner, and a
validation that can fail."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from slmc import api
from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.importers.hf import import_hf

META = {"get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_n_layers", "get_bos_id",
        "get_eos_ids", "use_kv_cache", "use_sdpa_with_kv_cache", "enable_dynamic_shape"}


@pytest.fixture(scope="module")
def artifact(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("et") / "tiny-et"
    res = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-o", str(out), "--max-seq-len", "64",
                                    "--json"])
    assert res.exit_code == 0, res.output
    return out


def test_manifest_describes_the_artifact(artifact, tiny_llama_dir):
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["format"] == "pte" and m["target"] == "executorch" and m["backend"] == "xnnpack"
    assert m["files"]["model.pte"] == (artifact / "model.pte").stat().st_size
    assert [i["name"] for i in m["io"]["forward"]["inputs"]] == ["tokens", "input_pos"]
    assert m["kv_cache_spec"]["max_len"] == 64 and m["kv_cache_spec"]["layout"] == "bhsd"
    assert len(m["source"]["sha256"]) == 64 and m["source"]["format"] == "hf"
    assert m["versions"]["executorch"] == "1.5.1" and "slmc" in m["versions"]
    assert "tokenizer.json" in m["tokenizer"]["files"] and (artifact / "tokenizer.json").is_file()
    assert set(m["runner"]["metadata_methods"]) == META
    assert [p["name"] for p in m["pipeline"]] == ["canon.split_projections"]


def test_pte_has_runner_metadata_methods(artifact):
    from executorch.runtime import Runtime

    prog = Runtime.get().load_program(str(artifact / "model.pte"))
    assert META | {"forward"} <= set(prog.method_names)
    assert prog.load_method("get_max_seq_len").execute([])[0] == 64
    assert list(prog.load_method("get_eos_ids").execute([])) == [2]


def test_stock_runner_generates_the_reference_text(artifact, tiny_llama_dir):
    """`slmc run` drives executorch's TextLLMRunner, unmodified; greedy text == reference."""
    from tokenizers import Tokenizer

    res = CliRunner().invoke(main, ["run", str(artifact), "-p", "Hello world", "-n", "16", "--raw"])
    assert res.exit_code == 0, res.output
    tok = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    ids = tok.encode("Hello world").ids
    out, _ = reference.greedy(import_hf(tiny_llama_dir, max_seq_len=64), ids, 16)
    expected = "".join(tok.id_to_token(t) for t in out)
    assert expected in res.output and "tok/s" in res.output


def test_validate_cli_passes_and_writes_json(artifact):
    res = CliRunner().invoke(main, ["validate", str(artifact), "--steps", "8", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["passed"] and report["decode_steps"] == 8 and report["prefill_max_abs"] < 1e-3


def test_validate_fails_against_a_different_model(artifact, tiny_llama_dir, tmp_path):
    """A perturbed reference must be caught: exit code 1, not a silent pass."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    w = load_file(other / "model.safetensors")
    w["model.layers.1.mlp.down_proj.weight"] += 0.05 * torch.randn_like(w["model.layers.1.mlp.down_proj.weight"])
    save_file(w, other / "model.safetensors", metadata={"format": "pt"})
    res = CliRunner().invoke(main, ["validate", str(artifact), "--steps", "8", "--reference", str(other)])
    assert res.exit_code == 1, res.output
    assert "validation failed" in res.output


def test_validate_refuses_a_changed_source(artifact, tiny_llama_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(artifact, moved)
    m = json.loads((moved / "manifest.json").read_text())
    m["source"]["sha256"] = "0" * 64
    (moved / "manifest.json").write_text(json.dumps(m))
    res = CliRunner().invoke(main, ["validate", str(moved), "--steps", "4"])
    assert res.exit_code == 2 and "changed since compile" in res.output
