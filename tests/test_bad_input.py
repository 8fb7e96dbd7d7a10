"""Bad input through the real CLI: every case exits 2 with ONE line on stderr that names
the offending file, field or option, shows no traceback, and leaves nothing behind in
the output's parent folder (neither the output nor a `.<name>.*` temp folder).

No case here needs a successful compile: the failing ones fail before lowering, and the
NaN-warning case (which must succeed) uses `slmc inspect`.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from slmc.cli import main
from slmc.compiler.families.llama import tiny_config

try:
    from tiny import save_hf_model  # tests/ on sys.path (no __init__.py)
except ImportError:  # pragma: no cover
    from tests.tiny import save_hf_model

WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    """One tiny random Llama checkpoint for the whole module; each test gets a copy."""
    d = tmp_path_factory.mktemp("src") / "tiny"
    save_hf_model(tiny_config(), d)
    assert (d / "config.json").is_file() and (d / WEIGHTS).is_file()
    return d


@pytest.fixture
def model(tiny_src, tmp_path) -> Path:
    d = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_src, d)
    return d


@pytest.fixture
def outroot(tmp_path) -> Path:
    d = tmp_path / "outroot"
    d.mkdir()
    return d


def edit_config(folder: Path, **changes) -> None:
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def cli(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def expect_error(args: list, *names: str, outroot: Path | None = None, left: tuple[str, ...] = ()) -> str:
    """Run the CLI; assert exit 2, one error line naming every one of `names`, no traceback,
    nothing on stdout, and only `left` (what was there before) in `outroot`."""
    res = cli(args)
    everything = res.output
    assert res.exit_code == 2, everything
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in everything
    assert res.stdout.strip() == ""
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    assert err.startswith("slmc: error:"), err
    for n in names:
        assert n in err, f"{n!r} not named in: {err}"
    if outroot is not None:
        assert listing(outroot) == sorted(left), listing(outroot)
    return err


def compile_args(model, outroot: Path, *extra) -> list:
    return ["compile", model, "-o", outroot / "out", "--max-seq-len", "32", *extra]


# ---------------------------------------------------------------- the model path


def test_missing_model_folder(tmp_path, outroot):
    missing = tmp_path / "no_such_model"
    expect_error(compile_args(missing, outroot), "no_such_model", "no such file", outroot=outroot)


def test_missing_model_folder_with_brackets_in_name(tmp_path, outroot):
    """Paths are printed as text, never read as console markup (`[v2]` must survive)."""
    missing = tmp_path / "model[v2]" / "sub[/x]"
    expect_error(compile_args(missing, outroot), "model[v2]", "sub[/x]", outroot=outroot)


def test_folder_without_config(model, outroot):
    (model / "config.json").unlink()
    expect_error(compile_args(model, outroot), "config.json", str(model), outroot=outroot)


def test_invalid_config_json(model, outroot):
    (model / "config.json").write_text("{ not json")
    expect_error(compile_args(model, outroot), "config.json", "invalid JSON", outroot=outroot)


def test_unsupported_architecture_lists_supported(model, outroot):
    edit_config(model, architectures=["GPTBigCodeForCausalLM"], model_type="gpt_bigcode")
    err = expect_error(compile_args(model, outroot), "GPTBigCodeForCausalLM", "config.json",
                       "LlamaForCausalLM", outroot=outroot)
    assert "supported" in err


@pytest.mark.parametrize("how", ["truncated", "garbage_length", "garbage_json"])
def test_broken_safetensors(model, outroot, how):
    p = model / WEIGHTS
    data = p.read_bytes()
    if how == "truncated":  # cut in half: the header is intact, the tensor data is not
        p.write_bytes(data[: len(data) // 2])
    elif how == "garbage_length":  # the 8-byte header length is nonsense
        p.write_bytes(b"\xde\xad\xbe\xef\xfe\xed\xfa\xce" + data[8:])
    else:  # a plausible length, then bytes that are not JSON
        (n,) = struct.unpack("<Q", data[:8])
        p.write_bytes(data[:8] + b"\x00\xff garbage [/red] \x80" * (n // 20) + data[8 + (n // 20) * 20:])
    err = expect_error(compile_args(model, outroot), WEIGHTS, outroot=outroot)
    assert ("truncated" if how == "truncated" else "corrupt") in err


def test_safetensors_not_a_file_that_size(model, outroot):
    """Too short to hold even the 8-byte header length."""
    (model / WEIGHTS).write_bytes(b"\x01\x02")
    expect_error(compile_args(model, outroot), WEIGHTS, "truncated", outroot=outroot)


class _Trap:
    """Unpickling this creates `marker`: the proof that something unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_folder_is_refused_and_never_unpickled(model, outroot, tmp_path):
    armed = tmp_path / "trap_works"  # the trap is real: unpickling it does make the marker
    pickle.loads(pickle.dumps(_Trap(armed)))
    assert armed.exists()

    marker = tmp_path / "UNPICKLED"
    (model / WEIGHTS).unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    err = expect_error(compile_args(model, outroot), "pytorch_model.bin", outroot=outroot)
    assert "safetensors" in err and "unpickle" in err
    assert not marker.exists()
    # `inspect` goes through the same importer
    expect_error(["inspect", model], "pytorch_model.bin")
    assert not marker.exists()


def test_trust_remote_code_model_is_refused(model, outroot, tmp_path):
    marker = tmp_path / "REMOTE_CODE_RAN"
    (model / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_config(model, architectures=["CustomForCausalLM"], model_type="custom",
                auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    err = expect_error(compile_args(model, outroot), "config.json", "trust_remote_code", outroot=outroot)
    assert "LlamaForCausalLM" in err  # says what would work instead
    assert not marker.exists()


@pytest.mark.parametrize("field, value", [("hidden_size", 96), ("intermediate_size", 200)])
def test_weights_contradict_config(model, outroot, field, value):
    edit_config(model, **{field: value})
    err = expect_error(compile_args(model, outroot), f"{WEIGHTS}:model.", "config implies", outroot=outroot)
    assert str(value) in err  # the size the config asks for, next to the size the tensor has


def _poison(model: Path, name: str, value: float) -> None:
    p = model / WEIGHTS
    tensors = load_file(p)
    t = tensors[name].clone()
    t.view(-1)[3] = value
    tensors[name] = t
    save_file(tensors, p, metadata={"format": "pt"})


def test_nan_weights_warn_without_strict(model, caplog):
    _poison(model, "model.layers.0.mlp.down_proj.weight", float("nan"))
    _poison(model, "model.layers.1.self_attn.o_proj.weight", float("inf"))
    res = cli(["inspect", model, "--max-seq-len", "32"])
    assert res.exit_code == 0, res.output
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("NaN/Inf" in w and "blocks.0.ffn.down" in w and "blocks.1.attn.o" in w
               for w in warnings), warnings


def test_nan_weights_fail_with_strict(model, outroot):
    _poison(model, "model.layers.0.mlp.down_proj.weight", float("nan"))
    err = expect_error(compile_args(model, outroot, "--strict"), "NaN/Inf", "blocks.0.ffn.down",
                       str(model.resolve()), "--strict", outroot=outroot)
    assert "blocks.1" not in err


def test_max_seq_len_over_model_limit(model, outroot):
    args = ["compile", model, "-o", outroot / "out", "--max-seq-len", "100000"]
    expect_error(args, "--max-seq-len", "100000", "256", outroot=outroot)
    expect_error(["inspect", model, "--max-seq-len", "1"], "--max-seq-len")


# ---------------------------------------------------------------- the output path


def test_output_is_an_existing_file(model, outroot):
    (outroot / "out").write_text("precious")
    expect_error(compile_args(model, outroot), str(outroot / "out"), "file", outroot=outroot, left=("out",))
    assert (outroot / "out").read_text() == "precious"


def test_output_under_a_file(model, outroot):
    (outroot / "afile").write_text("precious")
    args = ["compile", model, "-o", outroot / "afile" / "out", "--max-seq-len", "32"]
    expect_error(args, "afile", outroot=outroot, left=("afile",))
    assert (outroot / "afile").read_text() == "precious"


def test_output_folder_not_an_artifact_is_untouched(model, outroot):
    out = outroot / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    err = expect_error(compile_args(model, outroot), str(out), outroot=outroot, left=("out",))
    assert "not an slmc artifact" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["keep.txt", "sub", "sub/data.bin"]
    assert (out / "keep.txt").read_text() == "precious"
    assert (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"


def test_dump_ir_is_a_file(model, outroot, tmp_path):
    dump = tmp_path / "dump"
    dump.write_text("precious")
    expect_error(compile_args(model, outroot, "--dump-ir", dump), "--dump-ir", outroot=outroot)
    assert dump.read_text() == "precious"


# ---------------------------------------------------------------- options


def test_unknown_target(model, outroot):
    err = expect_error(compile_args(model, outroot, "--target", "tflite-nope"), "--target", "tflite-nope",
                       outroot=outroot)
    assert "executorch" in err  # lists what is available


def test_unknown_backend(model, outroot):
    err = expect_error(compile_args(model, outroot, "--backend", "cuda"), "--backend", "cuda",
                       outroot=outroot)
    assert "xnnpack" in err and "portable" in err


def test_unknown_backend_fails_before_import(tmp_path, outroot):
    """Option mistakes are reported before any model is read (even a missing one)."""
    expect_error(compile_args(tmp_path / "missing", outroot, "--backend", "cuda"), "--backend",
                 outroot=outroot)


def test_unknown_pass(model, outroot):
    err = expect_error(compile_args(model, outroot, "--pass", "no_such_pass"), "--pass", "no_such_pass",
                       outroot=outroot)
    assert "canon.fuse_projections" in err  # lists what is available
    expect_error(["inspect", model, "--pass", "no_such_pass"], "--pass", "no_such_pass")


@pytest.mark.parametrize("spec, names", [
    ("canon.fuse_projections:nope=1", ("--pass", "nope", "qkv")),
    ("canon.fuse_projections:qkv", ("--pass", "qkv")),
    ("canon.fuse_projections:qkv=maybe", ("--pass canon.fuse_projections:qkv", "maybe")),
])
def test_bad_pass_option(model, outroot, spec, names):
    expect_error(compile_args(model, outroot, "--pass", spec), *names, outroot=outroot)


# ---------------------------------------------------------------- GGUF


@pytest.mark.parametrize("content", [
    b"this is not a gguf file at all [/bold] \x00\x01" * 8,
    b"GGUF" + b"\xff\xfe garbage after the magic \x00" * 8,
    b"GGUF",
], ids=["no_magic", "magic_then_garbage", "magic_only"])
def test_garbage_gguf(tmp_path, outroot, content):
    p = tmp_path / "broken.gguf"
    p.write_bytes(content)
    expect_error(compile_args(p, outroot), "broken.gguf", outroot=outroot)
    expect_error(["inspect", p], "broken.gguf")


def test_file_that_is_neither_gguf_nor_folder(model, outroot):
    expect_error(compile_args(model / WEIGHTS, outroot), WEIGHTS, "folder", outroot=outroot)
