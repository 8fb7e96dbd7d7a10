"""coremltools' reshape shape inference, with each symbolic solve made once per conversion.

Inferring a reshape's output over symbolic dims (a dynamic length: every prefill reshape, and
decode's over the attended keys), coremltools asks sympy.solve for the dim its -1 stands for:
`64*is0 - 64*is14 = 0` for a fresh symbol is14. The passes re-infer every op many times over,
each time with a new fresh symbol, so the same equation is solved again and again: 3345 solves,
54 of 441 profiled seconds of the default model's Core ML compile. Here a solve is looked up by
its equation with the unknown replaced by a placeholder of the same assumptions; the answer
never contains the unknown, so it is the one sympy would give (the same package bytes:
tests/test_coreml_reshape_solve.py). Other sympy calls are sympy's own.
"""

from __future__ import annotations

from contextlib import contextmanager


class _Sympy:
    """The sympy module as the reshape op's code sees it, with solve memoized."""

    def __init__(self, sympy, solve):
        self._sympy, self.solve = sympy, solve

    def __getattr__(self, name):
        return getattr(self._sympy, name)


def memoized_solve(sympy):
    """sympy.solve(constraints, [x], dict=True) with answers kept by (equations with x as a
    placeholder); any other call form is passed through."""
    answers: dict = {}
    placeholders: dict = {}

    def solve(constraints, symbols, **kw):
        if kw != {"dict": True} or len(symbols) != 1 or not isinstance(symbols[0], sympy.Symbol):
            return sympy.solve(constraints, symbols, **kw)
        (x,) = symbols
        assumed = tuple(sorted(x.assumptions0.items()))
        u = placeholders.setdefault(assumed, sympy.Dummy("unknown", **x.assumptions0))
        key = tuple(sympy.sympify(c).xreplace({x: u}) for c in constraints)
        if key not in answers:
            answers[key] = sympy.solve(list(key), [u], dict=True)
        back = {u: x}
        return [{k.xreplace(back): v.xreplace(back) for k, v in sol.items()} for sol in answers[key]]

    solve.answers = answers  # for tests: what was solved
    return solve


@contextmanager
def solved_once():
    """Within: coremltools' reshape inference solves each symbolic equation once."""
    import sympy
    from coremltools.converters.mil.mil.ops.defs.iOS15 import tensor_transformation as tt

    original = tt.sm
    tt.sm = _Sympy(sympy, memoized_solve(sympy))
    try:
        yield tt.sm.solve
    finally:
        tt.sm = original
