"""Lowering reads the IR's values, never its memory layout.

quant.gptq's clip search once left its scales as a transposed view (torch.where follows the
strides of its condition); the lowering passed that view on, XNNPACK's serializer stored the
storage in memory order, and the .pte ran with every group's scale in the wrong place (block 0
off by 0.49, readback: "scales not stored unchanged"). Here every weight of an IR, quantized
scales and codes and float tables alike, is replaced by a transposed-stride view holding the
same values; each target's artifact must still match that IR block by block (`slmc diff`) and
store its codes and scales unchanged (readback). The control: against the same IR with one
block's scales x1.5 the artifact fails, so the check sees a wrong value when there is one."""

from __future__ import annotations

import copy

import pytest
import torch
from test_diff import FLOWS, MAX_LEN, scale_block

from slmc import api
from slmc.compiler.ir import QuantWeight, Weight, named_weights
from slmc.targets import target_of


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as `t`, laid out column-major (a 2-D transposed view)."""
    return t.T.contiguous().T if t.dim() == 2 else t


def restride(ir) -> int:
    n = 0
    for _, w in named_weights(ir):
        if isinstance(w, QuantWeight):
            w.codes, w.scales = strided(w.codes), strided(w.scales)
            if w.zeros is not None:
                w.zeros = strided(w.zeros)
            n += not w.scales.is_contiguous()
        elif isinstance(w, Weight) and w.data.dim() == 2:
            w._data = strided(w.data)
            n += not w.data.is_contiguous()
    return n


# The default suite runs ExecuTorch (where the transposed scales were stored) and ONNX; LiteRT and
# Core ML, whose lowering makes constants contiguous in the same shared code, with the slow suite.
@pytest.mark.parametrize("flow", [pytest.param(f, marks=pytest.mark.slow if f.startswith(("tflite", "coreml")) else ())
                                  for f in sorted(FLOWS)])
def test_artifact_ignores_ir_strides(flow, tiny_llama_dir, tmp_path):
    target, backend, passes = FLOWS[flow]
    ir, _ = api.run_passes(api.load(tiny_llama_dir, max_seq_len=MAX_LEN), passes)
    assert restride(ir) > 0, "no weight was re-laid out: the test would see nothing"
    folder, _ = api.compile_ir(ir, target, backend, tmp_path / "a", tokenizer=tiny_llama_dir)
    r = api.diff(folder, model_a=ir)
    assert r.sides[0]["artifact_check"]["matches"], r.to_json()
    assert r.passed and r.first_past is None, r.to_json()
    manifest = api.read_manifest(folder)
    rb = target_of(manifest).readback(ir, folder / manifest["artifact"])
    assert not rb.missing, rb.missing

    bad = copy.deepcopy(ir)  # control: a real change of value is still seen
    scale_block(bad)
    r = api.diff(folder, model_a=bad)
    # named at block 1, or (Core ML, whose debug variant is built from the IR given) caught by
    # the check of that variant against the artifact's own logits
    assert not r.passed and (r.first_past == "block 1" or not r.sides[0]["artifact_check"]["matches"]), r.to_json()
