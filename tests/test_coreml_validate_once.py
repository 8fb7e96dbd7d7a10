"""validated_once: a coremltools pass pipeline validates its program once, at its end, and still
rejects a program a pass broke (the control: without the final walk it would be accepted)."""

import pytest

pytest.importorskip("coremltools")

from coremltools.converters.mil.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass  # noqa: E402
from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipeline, PassPipelineManager  # noqa: E402
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY  # noqa: E402
from coremltools.converters.mil.mil.program import Program  # noqa: E402

from slmc.targets.coreml.validate_once import validated_once  # noqa: E402

PASSES = ["common::const_elimination", "common::dead_code_elimination", "common::noop_elimination"]
BREAK = "slmc_test::break_child_ops"


def _program():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x):
        return mb.relu(x=mb.add(x=x, y=1.0))
    return prog


class _BreakChildOps(AbstractGraphPass):
    """Leaves the program inconsistent: the input is recorded as consumed once more by relu."""

    def apply(self, prog):
        relu = prog.functions["main"].find_ops(op_type="relu")[0]
        relu.x.op.outputs[0].child_ops.append(relu)


@pytest.fixture
def count_validations(monkeypatch):
    calls = []
    real = Program.validate
    monkeypatch.setattr(Program, "validate", lambda self, **kw: (calls.append(kw), real(self, **kw))[1])
    return calls


def test_one_validation_per_pipeline_where_coremltools_makes_one_per_pass(count_validations):
    PassPipelineManager.apply_pipeline(_program(), PassPipeline(PASSES))
    assert len(count_validations) == 1 + len(PASSES)  # coremltools' own: before, and after each pass
    count_validations.clear()
    prog = _program()
    with validated_once():
        PassPipelineManager.apply_pipeline(prog, PassPipeline(PASSES))
    assert count_validations == [{"check_essential_scope": True}]  # the scope check DCE asks for
    assert "validate" not in vars(prog)  # the program's own method again
    PassPipelineManager.apply_pipeline(_program(), PassPipeline(PASSES))
    assert len(count_validations) == 2 + len(PASSES)  # restored on leaving


def test_a_broken_program_is_still_rejected(monkeypatch):
    monkeypatch.setitem(PASS_REGISTRY.passes, BREAK, _BreakChildOps())
    with validated_once(), pytest.raises(Exception, match="should be consumed by op"):
        PassPipelineManager.apply_pipeline(_program(), PassPipeline([BREAK] + PASSES))
    # control: were the final walk missing, the broken program would pass through
    monkeypatch.setattr(Program, "validate", lambda self, **kw: None)
    with validated_once():
        PassPipelineManager.apply_pipeline(_program(), PassPipeline([BREAK] + PASSES))
