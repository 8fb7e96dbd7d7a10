"""coremltools' fp16 overflow check in bounded memory (targets/coreml/lean.py): the same
answers as coremltools' own check, on edge values and on every op of a real conversion."""

from types import SimpleNamespace

import numpy as np
import pytest

from slmc.targets.coreml import lean

pytest.importorskip("coremltools")


def _op(value):
    """The slice of a MIL op that fp16_overflow reads: one fp32 const input."""
    const = SimpleNamespace(op_type="const", val=SimpleNamespace(val=value))
    var = SimpleNamespace(op=const, is_tensor_or_scalar_of=lambda dtype: dtype == "fp32")
    return SimpleNamespace(inputs={"x": var})


def _coremltools_answer(value) -> bool:
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    return FP16ComputePrecision.fp16_overflow(_op(value))


CASES = {
    "normal": np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32),
    "fp16 max": np.array([65504.0, -65504.0], np.float32),
    "just past fp16": np.array([1.0, np.nextafter(np.float32(65504), np.float32(1e9))], np.float32),
    "negative overflow last": np.r_[np.zeros(40, np.float32), np.float32(-7e4)],
    "inf and nan only": np.array([np.inf, -np.inf, np.nan, 0.5], np.float32),
    "1e38 counts as infinite": np.array([np.float32(1e38), np.float32(3e38)], np.float32),
    "just under 1e38": np.array([np.nextafter(np.float32(1e38), np.float32(0))], np.float32),
    "empty": np.zeros((0, 4), np.float32),
    "scalar overflow": np.float32(1e5),
    "scalar fine": np.float32(-3.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_answer_as_coremltools(name, monkeypatch):
    monkeypatch.setattr(lean, "CHUNK", 7)  # several chunks, the odd value in the last one
    value = CASES[name]
    assert lean._fp16_overflow(_op(value)) == _coremltools_answer(value)


def test_cases_include_both_answers():
    """A control: the cases above would catch a check that always answers the same."""
    answers = {_coremltools_answer(v) for v in CASES.values()}
    assert answers == {True, False}


def test_every_op_of_a_conversion_gets_coremltools_answer(tiny_llama_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    from slmc.cli import main

    original, asked = FP16ComputePrecision.fp16_overflow, []

    def both(op):
        ours = _lean(op)
        asked.append((ours, original(op)))
        return ours

    _lean = lean._fp16_overflow
    monkeypatch.setattr(lean, "_fp16_overflow", both)
    res = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-o", str(tmp_path / "c"),
                                    "--target", "coreml", "--max-seq-len", "32"])
    assert res.exit_code == 0, res.output
    assert len(asked) > 20 and all(a == b for a, b in asked)
    assert FP16ComputePrecision.fp16_overflow is original  # restored after converting
    assert not _lean(_op(np.ones(3, np.float32))) and _lean(_op(np.full(3, 7e4, np.float32)))


def test_underflow_search_still_runs_for_small_constants_only(monkeypatch):
    """coremltools searches constants under 400 values for fp16 underflow; bigger ones it skips
    after copying them to count (flatten): the patch skips those without the copy."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision as P

    searched = []
    monkeypatch.setattr(P, "_check_underflow_to_zero", lambda self, new, var: searched.append(np.size(var.val)))

    class NoCopy(np.ndarray):
        def flatten(self, *a, **k):
            raise AssertionError("copied to be counted")

    var = lambda n: SimpleNamespace(val=np.zeros(n, np.float32).view(NoCopy))  # noqa: E731
    with lean.lean_fp16_check():
        P._check_underflow_to_zero(None, var(399), var(399))
        P._check_underflow_to_zero(None, var(400), var(400))
        P._check_underflow_to_zero(None, SimpleNamespace(val=None), var(3))
    assert searched == [399]


def test_lean_conversion_writes_the_same_package(tiny_llama_dir, tmp_path, monkeypatch):
    """lean_conversion (no const re-inference, fp16 casts into scratch space, no serializer
    copies) changes memory, not output: the package's bytes equal coremltools' own path. The
    tiny model's weights count as big here, so every changed path runs (counted: a control)."""
    from click.testing import CliRunner

    from slmc.cli import main
    from slmc.compiler import spill
    from slmc.targets.coreml import target

    monkeypatch.setattr(spill, "MIN_BYTES", 4096)
    casts = []
    converted = spill.Spill.converted_array
    monkeypatch.setattr(spill.Spill, "converted_array", lambda self, a, d, **k: casts.append(a.shape) or converted(self, a, d, **k))

    def package(out, conversion):
        monkeypatch.setattr(target, "lean_conversion", conversion)
        res = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-o", str(out), "--target", "coreml",
                                        "--max-seq-len", "32"])
        assert res.exit_code == 0, res.output
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "model.mlpackage").rglob("*"))
                if p.is_file()}

    plain = package(tmp_path / "plain", lean.lean_fp16_check)
    assert casts == []
    ours = package(tmp_path / "lean", lean.lean_conversion)
    assert len(casts) >= 2 and ours.keys() == plain.keys()
    assert all(ours[k] == plain[k] for k in plain), [k for k in plain if ours[k] != plain[k]]
