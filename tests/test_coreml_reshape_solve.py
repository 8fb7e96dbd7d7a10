"""solved_once: coremltools' reshape inference gets sympy's own answers, each equation solved
once however many fresh symbols stand for its unknown; outside the context, sympy as it was."""

import pytest

pytest.importorskip("coremltools")

import sympy  # noqa: E402
from coremltools.converters.mil.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import get_new_symbol  # noqa: E402
from coremltools.converters.mil.mil.ops.defs.iOS15 import tensor_transformation as tt  # noqa: E402

from slmc.targets.coreml.reshape_solve import memoized_solve, solved_once  # noqa: E402


def test_answers_are_sympys_for_every_fresh_unknown():
    solve = memoized_solve(sympy)
    t, e = get_new_symbol(), get_new_symbol()
    for _ in range(3):  # the passes re-infer an op, each time with a new symbol for its -1
        x = get_new_symbol()
        for eq in ([64 * t - 64 * x], [64 * t - 32 * x], [4 * t * e - 2 * x * e]):
            assert solve(eq, [x], dict=True) == sympy.solve(eq, [x], dict=True)
    assert len(solve.answers) == 3  # three equations, solved once each
    y = get_new_symbol()
    # the unknown may stand on both sides of what is solved for: only it is the placeholder
    assert solve([-4 * t * y + 4 * e * x], [t], dict=True) == sympy.solve([-4 * t * y + 4 * e * x], [t], dict=True)


def test_other_call_forms_pass_through():
    solve, x = memoized_solve(sympy), sympy.Symbol("x")
    assert solve([x**2 - 4], [x]) == sympy.solve([x**2 - 4], [x])  # not dict=True
    assert not solve.answers


def test_a_dynamic_reshape_infers_the_same_shape_and_sympy_comes_back():
    def program():
        @mb.program(input_specs=[mb.TensorSpec(shape=(get_new_symbol(), 4, 16))])
        def prog(x):
            return mb.reshape(x=x, shape=[-1, 64])
        return prog

    def out_shape(prog):
        (op,) = prog.functions["main"].find_ops(op_type="reshape")
        return op.outputs[0].shape, prog.functions["main"].inputs["x"].shape[0]

    shape, t = out_shape(program())
    assert shape[0] == t and shape[1] == 64
    with solved_once() as solve:
        shape, t = out_shape(program())
        assert shape[0] == t and shape[1] == 64
        assert len(solve.answers) == 1
    assert tt.sm is sympy
