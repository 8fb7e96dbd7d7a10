"""slmc.api is the one entry: typed options, the CLI's jobs, catalog(); the CLI imports
nothing else from slmc."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from slmc import api
from slmc.cli import main
from slmc.errors import SlmcError


@pytest.mark.parametrize("module", ["cli.py", "cli_print.py"])
def test_cli_imports_only_the_api_and_errors(module):
    src = Path(api.__file__).with_name(module).read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from . import x / from .x import y
            mods = [f"slmc.{a.name}" for a in node.names] if node.module is None else [f"slmc.{node.module}"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slmc"):
            mods = [node.module]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names if a.name.startswith("slmc")]
        else:
            continue
        # slmc.build: `slmc build`'s no-op check must not import torch (tests/test_layering.py)
        assert set(mods) <= {"slmc.api", "slmc.errors", "slmc.build", "slmc.cli_print"}, mods


def test_list_prints_the_catalog():
    res = CliRunner().invoke(main, ["list"])
    assert res.exit_code == 0, res.output
    c = api.catalog()
    lines = res.output.splitlines()
    assert lines[0] == "architectures: " + ", ".join(c.architectures)
    assert lines[1] == "passes: " + ", ".join(c.passes)
    assert {"executorch", "tflite", "coreml"} <= set(c.targets) and "xnnpack" in c.targets["executorch"]
    assert "quant.rtn" in c.passes and "LlamaForCausalLM" in c.architectures
    assert [ln.split(" (")[0] for ln in lines if ln.startswith("recipe ")] == [f"recipe {r[0]}" for r in c.recipes]


def test_options_are_frozen_and_the_wrapper_takes_keywords(tmp_path):
    opts = api.CompileOptions("m", out=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.target = "tflite"
    with pytest.raises(TypeError):  # beyond (model, target, backend, out) every option is a keyword
        api.compile_model("m", "executorch", None, tmp_path, ["quant.rtn"])


def test_inspect_is_what_the_cli_prints(tiny_llama_dir, tmp_path):
    text = api.inspect(tiny_llama_dir, api.InspectOptions(passes=("canon.fuse_projections",), save_ir=tmp_path / "ir"))
    res = CliRunner().invoke(main, ["inspect", str(tiny_llama_dir), "--pass", "canon.fuse_projections"])
    assert res.exit_code == 0 and res.output == text
    assert "gate_up" in text  # the pass ran
    assert api.inspect(tmp_path / "ir") == text  # the saved IR reads back as the same model


def test_run_refuses_an_artifact_without_a_tokenizer(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tflite", "artifact": "model.tflite"}))
    with pytest.raises(SlmcError, match="no tokenizer.json"):
        api.run(tmp_path, api.RunOptions("hi"))
    res = CliRunner().invoke(main, ["run", str(tmp_path), "-p", "hi"])
    assert res.exit_code == 2 and "no tokenizer.json" in res.output


def test_evaluate_checks_its_options_first(tiny_llama_dir):
    with pytest.raises(SlmcError, match="window"):
        api.evaluate(str(tiny_llama_dir), api.EvalOptions(("x.txt",), window=8, stride=16))


def test_lowering_drops_source_traces_and_restores_the_setting(monkeypatch):
    """torch.fx records no per-node stack while slmc lowers (the artifacts are the same without,
    tests/test_reproducible.py), unless KEEP_TRACES_ENV asks for them; the caller's setting
    comes back, after an error too."""
    import torch.fx.config as fx_config

    from slmc._api.compile import KEEP_TRACES_ENV, untraced_sources

    monkeypatch.delenv(KEEP_TRACES_ENV, raising=False)
    monkeypatch.setattr(fx_config, "do_not_emit_stack_traces", False)
    seen = []

    @untraced_sources()
    def lower(fail=False):
        seen.append(fx_config.do_not_emit_stack_traces)
        if fail:
            raise SlmcError("conversion failed", "test")

    lower()
    with pytest.raises(SlmcError):
        lower(fail=True)
    monkeypatch.setenv(KEEP_TRACES_ENV, "1")
    lower()
    assert seen == [True, True, False]
    assert fx_config.do_not_emit_stack_traces is False


def test_torch_export_honours_the_setting(monkeypatch):
    """The setting reaches torch's tracer (a torch that renamed it would make the context a
    no-op): export inside it records no node's stack; outside (the control) it does."""
    import torch

    from slmc._api.compile import KEEP_TRACES_ENV, untraced_sources

    monkeypatch.delenv(KEEP_TRACES_ENV, raising=False)

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    def traces():
        ep = torch.export.export(M(), (torch.ones(2),)).run_decompositions()
        return [n.meta.get("stack_trace") for n in ep.graph.nodes if n.op == "call_function"]

    assert any(traces())
    with untraced_sources():
        untraced = traces()
    assert untraced and not any(untraced)
