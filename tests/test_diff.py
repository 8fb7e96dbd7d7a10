"""slmc diff (issue 14, item 4): per-block hidden states of an artifact's debug variant in its own
runtime against the reference executor. For every target that runs on this host, an honest
artifact has every stage within its fixed bound, and an artifact compiled from an IR with one
block's weights scaled x1.5 (block 1 of 2) is named at "block 1", with the embedding and
block 0 still within the bound. A debug variant built from another IR than the artifact's is
caught by the artifact check (no verdict on blocks)."""

from __future__ import annotations

import copy

import pytest
from test_broken_artifacts import scaled

from slmc import api
from slmc.compiler.families import load_all
from slmc.compiler.ir import QuantWeight, Weight, named_weights

load_all()

MAX_LEN = 32
ACT8 = "quant.rtn:bits=4,group_size=32,scale_dtype=bfloat16,act_bits=8,symmetric=true,head_bits=4,embed_bits=4"
WEIGHT_ONLY_FP16 = "quant.rtn:bits=4,group_size=32,symmetric=true,head_bits=8,scale_dtype=float16"
FLOWS = {  # target, backend, passes: one host flow per target, the bounds of each weight kind
    "executorch-xnnpack-8da4w": ("executorch", "xnnpack", (ACT8,)),
    "tflite-cpu-8da4w": ("tflite", "cpu", (ACT8,)),
    "coreml-cpu-fp16-4w": ("coreml", "cpu", (WEIGHT_ONLY_FP16,)),
    "onnx-cpu-fp32": ("onnx", "cpu", ()),
}
BROKEN = "block 1"


def scale_block(ir, depth: int = 1) -> None:
    """Block `depth`'s MLP down projection x1.5: its scales (kept in their storage dtype) or its floats."""
    name, w = next((n, w) for n, w in named_weights(ir) if n.startswith(f"blocks.{depth}.ffn.down"))
    if isinstance(w, QuantWeight):
        w.scales = scaled(w.scales, 1.5)
    else:
        setattr(_owner(ir, name), name.rsplit(".", 1)[1], Weight(w.data * 1.5))


def _owner(ir, dotted: str):
    obj = ir
    for part in dotted.split(".")[:-1]:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def build(source, flow, out, broken: bool):
    target, backend, passes = FLOWS[flow]
    ir, _ = api.run_passes(api.load(source, max_seq_len=MAX_LEN), passes)
    honest = ir
    if broken:
        ir = copy.deepcopy(ir)
        scale_block(ir)
    folder, _ = api.compile_ir(ir, target, backend, out, tokenizer=source)
    return folder, ir, honest


def show(r) -> None:
    print(f"{r.a} vs {r.b}: bound {r.bound:.3g}, first past {r.first_past}")
    for s in r.stages:
        print(f"  {s['stage']:>10}  max|Δ| {s['max_abs']:.3g}  rel {s['rel_rms']:.3g}  cos {s['cosine']:.6f}")


# ExecuTorch 8da4w (two ~80 s compiles) runs with the slow suite: its debug variant and a named
# block stay in the default suite through test_layout_independent's ExecuTorch flow.
@pytest.mark.parametrize("flow", [pytest.param(f, marks=pytest.mark.slow if f.startswith("executorch") else ())
                                  for f in sorted(FLOWS)])
def test_honest_within_and_broken_block_named(flow, tiny_llama_dir, tmp_path):
    folder, ir, _ = build(tiny_llama_dir, flow, tmp_path / "honest", broken=False)
    r = api.diff(folder, model_a=ir)
    show(r)
    assert r.sides[0]["artifact_check"]["matches"], r.to_json()
    assert r.passed and r.first_past is None, r.to_json()
    assert [s["stage"] for s in r.stages] == ["embedding", "block 0", "block 1", "final norm", "logits"]

    bad, bad_ir, honest = build(tiny_llama_dir, flow, tmp_path / "broken", broken=True)
    r = api.diff(bad, model_a=bad_ir, model_b=honest)
    show(r)
    assert r.sides[0]["artifact_check"]["matches"], r.to_json()
    assert not r.passed and r.first_past == BROKEN, r.to_json()
    assert all(s["within"] for s in r.stages[:2]), r.to_json()  # embedding, block 0


def test_debug_variant_from_another_ir_is_caught(tiny_llama_dir, tmp_path):
    """The CLI builds the debug program from the IR the manifest names; an artifact that was not
    compiled from it must not get a verdict on its blocks."""
    bad, _, honest = build(tiny_llama_dir, "onnx-cpu-fp32", tmp_path / "broken", broken=True)
    r = api.diff(bad, model_a=honest)
    assert not r.sides[0]["artifact_check"]["matches"], r.to_json()
    assert not r.passed and any("does not reproduce" in n for n in r.notes), r.to_json()


@pytest.mark.slow  # two more compiles and debug variants (the per-target cases above cover each runtime)
def test_artifact_vs_artifact(tiny_llama_dir, tmp_path):
    a, ir, _ = build(tiny_llama_dir, "executorch-xnnpack-8da4w", tmp_path / "pte", broken=False)
    b, _, _ = build(tiny_llama_dir, "tflite-cpu-8da4w", tmp_path / "tflite", broken=False)
    r = api.diff(a, b, model_a=ir, model_b=ir)
    show(r)
    assert r.mode == "artifact-vs-artifact" and r.passed, r.to_json()
    assert r.bound == pytest.approx(0.1)  # the two artifacts' own bounds added


# Measured 2026-12-02 (tiny llama): block 1's down projection x1.5 moves block 1 by rel RMS 0.089
# between a .pte and a .tflite, under the 0.1 of two int8-activation artifacts' bounds added
# (0.05 each, runtime_tests/diff.py), so artifact-vs-artifact does not name it (against the
# reference, bound 0.05, it does: test above). A known gap of the bound's sensitivity, not loosened
# here: strict, so the suite flags the day it is caught.
@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "artifact-vs-artifact bound 0.1 (0.05 + 0.05) > the x1.5 block's rel RMS 0.089: the broken block is not named"))
def test_artifact_vs_artifact_names_a_broken_block(tiny_llama_dir, tmp_path):
    a, ir, _ = build(tiny_llama_dir, "executorch-xnnpack-8da4w", tmp_path / "pte", broken=False)
    bad, bad_ir, _ = build(tiny_llama_dir, "tflite-cpu-8da4w", tmp_path / "broken", broken=True)
    r = api.diff(a, bad, model_a=ir, model_b=bad_ir)
    show(r)
    assert not r.passed and r.first_past == BROKEN, r.to_json()


def test_float_vs_quantized(tiny_llama_dir):
    q = api.diff(tiny_llama_dir, opts=api.DiffOptions(recipe="int8da-int4w-g32", max_seq_len=MAX_LEN))
    show(q)
    # int4 weights move the stream by more than float rounding, and by more as blocks add up
    # (compared block to block: the final norm rescales the stream, so it is not a later block)
    assert q.mode == "float-vs-quantized" and q.stages[1]["rel_rms"] > 1e-3
    blocks = [s["rel_rms"] for s in q.stages if s["stage"].startswith("block")]
    assert len(blocks) >= 2 and blocks[-1] >= blocks[0]


def test_cli_float_vs_quantized_table_json_and_report(tiny_llama_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from slmc.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["diff", str(tiny_llama_dir), "--recipe", "int8da-int4w-g32", "--max-seq-len", str(MAX_LEN)])
    assert r.exit_code == 0, r.output
    assert "block 1" in r.output and "final norm" in r.output and "rel RMS" in r.output
    page = tmp_path / "q.html"
    r = runner.invoke(main, ["diff", str(tiny_llama_dir), "--recipe", "int8da-int4w-g32", "--max-seq-len", str(MAX_LEN),
                             "--json", "--report", str(page)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["mode"] == "float-vs-quantized" and len(data["stages"]) == 5
    assert "<svg" in page.read_text() and "quant.awq" in page.read_text()  # the recipe's method
    # no passes: nothing to compare a model with (one line, exit 2)
    r = runner.invoke(main, ["diff", str(tiny_llama_dir)])
    assert r.exit_code == 2 and "needs --pass or --recipe" in r.output
