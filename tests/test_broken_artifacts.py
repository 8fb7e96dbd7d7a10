"""Broken-artifact controls (issue 14, item 2): `validate` must FAIL a deliberately broken
artifact and PASS the honest artifact of the same flow, always against the honest reference.

Breaks in the IR that gets lowered (the reference is the honest IR, passed as `model=`):
  act   activation quantization removed (act_bits 8 -> 0 on every quantized linear)
  scale one layer's weight scales x1.5
  head  two codes flipped in the quantized head
Breaks in the lowering, patched during compile only (the reference executor is independent):
  kv    every KV-cache row written one position later than its token's position
  rope  one RoPE frequency x1.5 in the lowering's rope tables
A control that validate does not FAIL under the published bounds would be a known gap: marked
xfail(strict) with the numbers it passed with, so the suite flags the day the bounds catch it.
Today there is none (KNOWN_GAPS below). Where the codes check must catch a break (BY_CODES), the
FAIL must name it: the statistics alone may not (a tiny random model's two flipped head codes
move the mean KL by less than the bound).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import slmc.compiler.lowering.attention as lowering_attention
import slmc.compiler.lowering.math as lowering_math
from slmc import api
from slmc.compiler.families import load_all
from slmc.compiler.ir import QuantWeight, named_weights

load_all()

MAX_LEN = 48
STEPS = 24
# the int8da-int4w-g32 recipe's pass (the recipe with its int4 head and embedding: codes for control c)
ACT8 = "quant.rtn:bits=4,group_size=32,scale_dtype=bfloat16,act_bits=8,symmetric=true,head_bits=4,embed_bits=4"
WEIGHT_ONLY = "quant.rtn:bits=4,group_size=32,symmetric=true,head_bits=8"
WEIGHT_ONLY_FP16 = WEIGHT_ONLY + ",scale_dtype=float16"  # Core ML fp16 stores fp16 scales


@dataclass(frozen=True)
class Flow:
    target: str
    backend: str
    passes: tuple[str, ...]  # () : a float flow


FLOWS = {
    "executorch-xnnpack-8da4w": Flow("executorch", "xnnpack", (ACT8,)),
    "executorch-portable-fp32": Flow("executorch", "portable", ()),
    "tflite-cpu-8da4w": Flow("tflite", "cpu", (ACT8,)),
    "tflite-cpu-4w": Flow("tflite", "cpu", (WEIGHT_ONLY,)),
    "tflite-cpu-fp32": Flow("tflite", "cpu", ()),
    "coreml-cpu-fp32-4w": Flow("coreml", "cpu:precision=fp32,kv=io", (WEIGHT_ONLY,)),
    "coreml-cpu-fp16-4w": Flow("coreml", "cpu", (WEIGHT_ONLY_FP16,)),  # states, fp16 compute
    "onnx-cpu-fp32": Flow("onnx", "cpu", ()),
    "onnx-cpu-4w": Flow("onnx", "cpu", (WEIGHT_ONLY,)),  # MatMulNBits / GatherBlockQuantized, exact dequant
}


class ControlPassed(AssertionError):
    """validate did not FAIL a deliberately broken artifact (PASS or INCONCLUSIVE)."""


# --- the breaks ------------------------------------------------------------------------------------

def quant_weights(ir):
    return [(n, w) for n, w in named_weights(ir) if isinstance(w, QuantWeight)]


def drop_act_quant(ir) -> None:
    changed = [w for _, w in quant_weights(ir) if w.act_bits]  # every layer and the head
    assert changed, "the flow has no int8-activation weights to break"
    for w in changed:
        w.act_bits = 0


def scaled(scales: torch.Tensor, factor: float) -> torch.Tensor:
    """scales x factor, still values of their storage dtype (XNNPACK bf16, Core ML fp16), or the
    target refuses them."""
    out = scales * factor
    for dtype in (torch.bfloat16, torch.float16):
        if torch.equal(scales, scales.to(dtype).to(scales.dtype)):
            return out.to(dtype).to(scales.dtype)
    return out


def scale_one_layer(ir) -> None:
    _, w = next((n, w) for n, w in quant_weights(ir) if n.startswith("blocks."))  # layer 0's first
    w.scales = scaled(w.scales, 1.5)


def flip_head_codes(ir) -> None:
    w = ir.lm_head.weight if ir.lm_head is not None else None
    assert isinstance(w, QuantWeight), "the flow's head is not quantized"
    codes = w.codes.clone()
    flat = codes.view(-1)
    for i in flat.float().abs().topk(2).indices:  # the two largest codes: flip every bit (c -> -1 - c)
        flat[i] = -1 - flat[i] if w.symmetric else (2 ** w.bits - 1) - flat[i]
    w.codes = codes


def shifted_kv_writes(monkeypatch) -> None:
    """Row caches: every row lands one slot later (validate never reaches the last slot)."""
    original = lowering_attention.write_rows

    def write_rows(cache, axis, slots, new, inplace, pad=None, writer=None):
        rows = (cache[0] if isinstance(cache, tuple) else cache).shape[axis]
        return original(cache, axis, torch.remainder(slots + 1, rows), new, inplace, pad=pad, writer=writer)

    monkeypatch.setattr(lowering_attention, "write_rows", write_rows)
    # Core ML's stacked caches: rows [start, end) land at [start + 1, end + 1), written into the
    # cache padded by one row (so export can prove the slice fits) and cut back to its length
    def write_span(kc, vc, k_new, v_new, span, inplace, bshd):
        start, end = span
        axis = 0 if bshd else 1

        def shifted(cache, new):
            grown = torch.cat([cache, torch.zeros_like(cache.narrow(axis, 0, 1))], axis)
            return torch.slice_scatter(grown, new, axis, start + 1, end + 1).narrow(axis, 0, cache.shape[axis])

        k_all, v_all = shifted(kc, k_new), shifted(vc, v_new)
        if inplace:
            kc.copy_(k_all)
            vc.copy_(v_all)
            k_all, v_all = kc, vc
        keys = k_all[:end].transpose(0, 1) if bshd else k_all[:, :end]
        values = v_all[:end].transpose(0, 1) if bshd else v_all[:, :end]
        return k_all, v_all, keys, values

    monkeypatch.setattr(lowering_attention, "write_span", write_span)


def wrong_rope_frequency(monkeypatch) -> None:
    original = lowering_math.rope_frequencies

    def rope_frequencies(rope):
        freq = original(rope).clone()
        freq[1] = freq[1] * 1.5
        return freq

    monkeypatch.setattr(lowering_math, "rope_frequencies", rope_frequencies)


IR_BREAKS = {"act": drop_act_quant, "scale": scale_one_layer, "head": flip_head_codes}
LOWERING_BREAKS = {"kv": shifted_kv_writes, "rope": wrong_rope_frequency}


# --- compile + validate ----------------------------------------------------------------------------

_HONEST: dict = {}


def honest_ir(source: Path, flow: Flow):
    if flow not in _HONEST:
        ir, _ = api.run_passes(api.load(source, max_seq_len=MAX_LEN), flow.passes)
        _HONEST[flow] = ir
    return _HONEST[flow]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json" and p.suffix != ".litertlm":
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def build(source: Path, flow: Flow, out: Path, control: str | None, monkeypatch) -> Path:
    ir = honest_ir(source, flow)
    if control in IR_BREAKS:
        ir = copy.deepcopy(ir)
        IR_BREAKS[control](ir)
    with monkeypatch.context() as m:  # a lowering break lives for the compile only
        if control in LOWERING_BREAKS:
            LOWERING_BREAKS[control](m)
        folder, _ = api.compile_ir(ir, flow.target, flow.backend, out, tokenizer=source)
    return folder


def check(report, name: str) -> str:
    tol = report.tolerance
    line = (f"{name}: {report.verdict} over {report.positions} positions: max|Δ|={report.prefill_max_abs:.4g} "
            f"(decode {report.decode_max_abs:.4g}) top-1={report.top1_agreement:.4f} KL={report.mean_kl:.3g} "
            f"Δppl={report.delta_ppl:+.3%} greedy={'equal' if report.greedy_equal else 'differs'}; bound {tol}; "
            f"reasons: {report.reasons}")
    if report.noise_floor:
        nf = report.noise_floor
        line += f"; noise floor KL={nf['mean_kl']:.3g} top-1={nf['top1']:.4f} Δppl={nf['delta_ppl']:+.3%}"
    print(line)
    return line


_HONEST_DIGEST: dict = {}


def honest_artifact(source, flow, tmp_path_factory, monkeypatch) -> Path:
    if flow not in _HONEST_DIGEST:
        folder = build(source, flow, tmp_path_factory.mktemp("honest") / "a", None, monkeypatch)
        _HONEST_DIGEST[flow] = (folder, digest(folder))
    return _HONEST_DIGEST[flow][0]


# --- the cases -------------------------------------------------------------------------------------

# Where a control runs by default: the one int8-activation ExecuTorch flow (the default suite must
# stay fast); every other case runs with `slow`.
# rope's tables are a shared lowering component; its controls (every flow) run with the slow suite
DEFAULT = {("executorch-xnnpack-8da4w", c) for c in ("scale", "head", "kv")}

# Controls validate does not FAIL under the published bounds (targets/bounds.py): (flow, control)
# -> the measured numbers and the cause, marked xfail(strict) so the suite flags the day the
# bounds catch it. None today: the last one, LiteRT's flipped head codes (mean KL 3.0e-5 under
# 1e-4 on the tiny model), is caught by the codes check since the readback reads the head in the
# logits matmul's own tensor, not anywhere in the file (the tied table held the honest bytes).
KNOWN_GAPS: dict[tuple[str, str], str] = {}

# How each break is caught (measured 2026-12-02 on conftest's tiny_llama_dir: the same seed-0 model
# this module's own fixture built, so no number moved; 517 teacher-forced positions; pytest -s
# prints each case's numbers):
# - scale, head (every quantized flow): the codes check: the artifact's tensors do not hold the
#   reference's scales / codes (LiteRT reads the head in the logits matmul's own tensor). The
#   statistics catch scale too (8da4w: top-1 74.3 %, KL 1.8e-3; weight-only: max|Δ| 0.43) and the
#   weight-only head (max|Δ| 0.97 > 2e-3), not the 8da4w head: max|Δ| 0.37, top-1 100 %, KL 3.0e-5
#   (bound 1e-4), Δppl -0.022 %: two flipped codes move two of a tiny random model's 256 logits.
# - kv (8da4w: top-1 71.4 %, KL 6.6e-3; float: max|Δ| 1.6) and rope (8da4w: top-1 95.6 % < 99 %,
#   though KL 2.5e-5 < 1e-4; Core ML fp16: top-1 95.9 %; float: max|Δ| 0.052) by the statistics.
#   Re-measured on ExecuTorch 8da4w after the sampled windows stopped sharing rows (517 distinct
#   positions): scale top-1 74.7 % / KL 1.9e-3, kv 73.1 % / 6.7e-3, rope 97.5 % / 3.0e-5 (still < 99 %);
#   the other flows' numbers above are from the earlier windows.
# - act: on ExecuTorch/XNNPACK there is no artifact, the target refuses it (test below). On LiteRT
#   the codes check: the int8-activation weights are dequantized to float instead of being the
#   FULLY_CONNECTED filters; the manifest's weight-only storage also puts it under the exact rule
#   (max|Δ| 0.020 > 2e-3, top-1 99.6 %), while the int8-activation bound alone would pass it (KL
#   4.6e-6, Δppl +0.02 %): on a tiny random model dropping activation quantization costs little.

# Quantized flows whose controls the codes check must name (the artifact's bytes do not hold the
# reference's codes/scales in the tensors it reads for them), whatever the statistics say.
BY_CODES = {(f, c) for f in ("executorch-xnnpack-8da4w", "tflite-cpu-8da4w", "tflite-cpu-4w", "onnx-cpu-4w",
                             "coreml-cpu-fp32-4w", "coreml-cpu-fp16-4w") for c in ("scale", "head")} | \
    {("tflite-cpu-8da4w", "act")}
CASES = [("executorch-xnnpack-8da4w", c) for c in ("scale", "head", "kv", "rope")] + \
        [("tflite-cpu-8da4w", c) for c in ("act", "scale", "head", "kv", "rope")] + \
        [(f, c) for f in ("tflite-cpu-4w", "onnx-cpu-4w") for c in ("scale", "head")] + \
        [(f, c) for f in ("coreml-cpu-fp32-4w", "coreml-cpu-fp16-4w") for c in ("scale", "head", "kv", "rope")] + \
        [(f, c) for f in ("executorch-portable-fp32", "tflite-cpu-fp32", "onnx-cpu-fp32") for c in ("kv", "rope")]


def _marks(case):
    marks = [] if case in DEFAULT else [pytest.mark.slow]
    if case in KNOWN_GAPS:
        marks.append(pytest.mark.xfail(strict=True, raises=ControlPassed, reason=KNOWN_GAPS[case]))
    return marks


HONEST_FLOWS = sorted({f for f, _ in CASES})


@pytest.mark.parametrize("flow_name", [pytest.param(f, marks=() if f == "executorch-xnnpack-8da4w"
                                                    else pytest.mark.slow) for f in HONEST_FLOWS])
def test_honest_artifact_passes(flow_name, tiny_llama_dir, tmp_path_factory, monkeypatch):
    flow = FLOWS[flow_name]
    folder = honest_artifact(tiny_llama_dir, flow, tmp_path_factory, monkeypatch)
    report = api.validate_artifact(folder, steps=STEPS, model=honest_ir(tiny_llama_dir, flow), record=False)
    check(report, f"{flow_name} honest")
    assert report.verdict == "PASS" and report.passed, report.to_json()


@pytest.mark.parametrize("flow_name,control", [pytest.param(f, c, id=f"{f}-{c}", marks=_marks((f, c)))
                                               for f, c in CASES])
def test_broken_artifact_fails(flow_name, control, tiny_llama_dir, tmp_path_factory, tmp_path, monkeypatch):
    flow = FLOWS[flow_name]
    honest_artifact(tiny_llama_dir, flow, tmp_path_factory, monkeypatch)
    folder = build(tiny_llama_dir, flow, tmp_path / "broken", control, monkeypatch)
    # the break reached the artifact (else a PASS below would say nothing about the bounds)
    assert digest(folder) != _HONEST_DIGEST[flow][1], f"{control} left the {flow_name} artifact unchanged"
    report = api.validate_artifact(folder, steps=STEPS, model=honest_ir(tiny_llama_dir, flow), record=False)
    line = check(report, f"{flow_name} {control}")
    if report.verdict != "FAIL" or report.passed:  # INCONCLUSIVE blocks the artifact but proves nothing about the bound
        raise ControlPassed(f"validate did not FAIL the broken artifact: {line}\n{report.notes}")
    if (flow_name, control) in BY_CODES:
        assert any("not stored as the reference's codes" in r for r in report.reasons), line


def test_xnnpack_refuses_dropped_activation_quantization(tiny_llama_dir, tmp_path):
    """Control (a) cannot reach an ExecuTorch/XNNPACK artifact: its linears hold int4 codes only
    with int8 activations, so compile refuses the broken IR before anything is written."""
    from slmc.errors import UnsupportedError

    ir = copy.deepcopy(honest_ir(tiny_llama_dir, FLOWS["executorch-xnnpack-8da4w"]))
    drop_act_quant(ir)
    with pytest.raises(UnsupportedError, match="needs act_bits=8"):
        api.compile_ir(ir, "executorch", "xnnpack", tmp_path / "broken", tokenizer=tiny_llama_dir)
    assert not (tmp_path / "broken").exists()
