"""Block-isolated check (runtime_tests/isolated.py): every block of an artifact's debug variant
fed its own input, against the reference's block on that input. On ExecuTorch/XNNPACK 8da4w (the
tiny Llama), the honest artifact PASSes at float32 roundoff, and each broken-input control FAILs
at the block it breaks, under the bound fixed in advance (1e-2 for int8 activations):
  act    activation quantization removed (the lowering keeps the int4 weights, dequantized
         exactly, with float activations: XNNPACK has no int4 weight-only GEMM, so compile
         refuses the IR break and the break is made in the lowering instead)
  scale  one layer's weight scales x1.5 (block 0's first quantized linear)
  kv     every KV-cache row written one position later
Controls run the broken debug variant only (Target.hidden_states, what --isolated judges),
judged against the honest IR; the honest case runs the whole `diff --isolated` path with its
compiled artifact (the debug variant must reproduce the artifact's own logits).

Measured 2026-12-02 (tiny llama, 31 prompt tokens; pytest -s prints every stage): honest every
stage <= 2.3e-7 (no code flipped); act block 0 0.0110 (FAIL, 1.10x the bound: the thinnest
margin), block 1 0.0082 and logits 0.0069 within it; scale block 0 0.43; kv blocks 0 / 1 0.58 / 0.44.
"""

from __future__ import annotations

import copy
import json

import pytest
from test_broken_artifacts import scale_one_layer, shifted_kv_writes

from slmc import api
from slmc.compiler.families import load_all
from slmc.compiler.lowering import layers
from slmc.runtime_tests import isolated
from slmc.targets import target_of

load_all()

MAX_LEN = 32
RECIPE = "int8da-int4w-g32-rtn"  # 8-bit dynamic activations, 4-bit weights (round to nearest: no calibration)


def drop_act_quant_in_lowering(monkeypatch) -> None:
    """Every quantized weight lowered as its exact float dequantization: float activations."""
    original = layers._Params.__init__

    def init(self, owner, dtype, dequantize=False):
        original(self, owner, dtype, True)

    monkeypatch.setattr(layers._Params, "__init__", init)


@pytest.fixture(scope="module")
def honest(tiny_et_8da4w, tmp_path_factory):
    """The int8da-int4w-g32-rtn recipe (its passes in the manifest, so the CLI rebuilds the same IR):
    conftest's shared tiny ExecuTorch artifact, this module's own copy."""
    folder, manifest = tiny_et_8da4w(tmp_path_factory.mktemp("et") / "a")
    # the numbers in the docstring are for this recipe and cache length
    assert (manifest["recipe"], manifest["kv_cache_spec"]["max_len"]) == (RECIPE, MAX_LEN)
    return folder, manifest, api.reference_model(folder, manifest)


def show(r) -> None:
    print(f"{r.artifact}: {r.verdict}, bound {r.bound:.3g}, first past {r.first_past}")
    for s in r.stages:
        print(f"  {s['stage']:>10}  rel {s['rel']:.3g}  max|Δ| {s['max_abs']:.3g}  cos {s['cosine']:.6f}  "
              f"floor {s['floor']:.3g}")


def test_honest_passes(honest):
    folder, _, _ = honest
    r = api.diff_isolated(folder)  # the IR rebuilt from the manifest, as the CLI does (cached for its test)
    show(r)
    assert r.artifact_check["matches"], r.to_json()
    assert r.verdict == "PASS" and r.passed and r.first_past is None, r.to_json()
    assert r.bound == isolated.ISO_ACT8
    assert [s["stage"] for s in r.stages] == ["embedding", "block 0", "block 1", "final norm", "logits"]
    assert max(s["rel"] for s in r.stages) < 1e-5  # float32 roundoff: no code flipped


@pytest.mark.parametrize("control,broken", [("act", "block 0"), ("scale", "block 0"), ("kv", "block 0")])
def test_control_fails(control, broken, honest, tiny_llama_dir, monkeypatch):
    folder, manifest, ir = honest
    bad = ir
    if control == "act":
        drop_act_quant_in_lowering(monkeypatch)
    elif control == "scale":
        bad = copy.deepcopy(ir)
        scale_one_layer(bad)
    else:
        shifted_kv_writes(monkeypatch)
    from slmc._api.diff import _prompt

    ids = _prompt(folder, ir, None)  # the prompt diff --isolated uses
    inter = target_of(manifest).hidden_states(bad, manifest, ids)
    bound, why = isolated.isolated_bound(manifest)
    r = isolated.judge(ir, ids, inter.states, inter.logits, bound, why, f"{control} control")
    show(r)
    assert r.verdict == "FAIL" and not r.passed and r.first_past == broken, r.to_json()
    assert r.stages[0]["within"], r.to_json()  # the embedding is untouched by every control


def test_cli_diff_isolated_and_validate_by_block(honest):
    """The CLI's two entries print the table and exit 0 on the honest artifact; --by-block names the
    end-to-end verdict's absence and what the block-isolated verdict proves."""
    from click.testing import CliRunner

    from slmc.cli import main

    folder, _, _ = honest
    runner = CliRunner()
    r = runner.invoke(main, ["diff", str(folder), "--isolated", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])
    assert data["verdict"] == "PASS" and len(data["stages"]) == 5
    r = runner.invoke(main, ["validate", str(folder), "--by-block"])
    assert r.exit_code == 0, r.output
    assert "block-isolated verdict" in r.output and "not judged" in r.output and "end-to-end verdict" in r.output
    r = runner.invoke(main, ["diff", str(folder), "other", "--isolated"])
    assert r.exit_code == 2 and "--isolated" in r.output
