"""The guard of idle_passes.py (an XNNPACK pass that changed nothing skips its re-trace): it
sees every kind of edit, and a pass that edits still re-traces. That a skipped re-trace gives
the real one's graph, and the .pte ExecuTorch's bytes, is checked on a real lowering in
tests/test_lean_lowering.py."""

import pytest
import torch

pytest.importorskip("executorch")

from helpers import graph_structure  # noqa: E402
from slmc.targets.executorch import idle_passes  # noqa: E402


def _gm():
    return torch.fx.symbolic_trace(lambda x: torch.relu(x + 1) * 2)


def test_guard_sees_each_kind_of_edit():
    gm = _gm()
    before = idle_passes.graph_shape(gm)
    assert idle_passes._unchanged(None, before, gm)
    add = next(n for n in gm.graph.nodes if n.op == "call_function")
    add.args = (add.args[0], 2)  # re-wired
    assert not idle_passes._unchanged(None, before, gm)
    gm = _gm()
    before = idle_passes.graph_shape(gm)
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    relu.target = torch.sigmoid  # another op
    assert not idle_passes._unchanged(None, before, gm)
    gm = _gm()
    before = idle_passes.graph_shape(gm)
    with gm.graph.inserting_after(relu := next(n for n in gm.graph.nodes if n.target is torch.relu)):
        gm.graph.call_function(torch.neg, (relu,))  # a node added
    assert not idle_passes._unchanged(None, before, gm)


def test_a_pass_that_edits_still_retraces(monkeypatch):
    """FuseActivationPass folds a relu into the add before it: an edit, so it re-traces (the
    control); with nothing to fold it skips."""
    from executorch.backends.xnnpack._passes.fuse_activation_pass import FuseActivationPass
    from executorch.exir import EdgeCompileConfig, to_edge

    class AddThen(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.act = act

        def forward(self, x):
            return self.act(x + x)

    def edge(relu: bool):
        m = AddThen(torch.relu if relu else torch.sigmoid)  # relu folds into the add; sigmoid does not
        ep = torch.export.export(m, (torch.randn(2, 8),), strict=False)
        return to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).exported_program()

    unchanged = idle_passes._unchanged
    for relu, skipped in ((True, False), (False, True)):
        ep = edge(relu)
        skips = []  # the guard's answers: True skips the pass's re-trace
        monkeypatch.setattr(idle_passes, "_unchanged", lambda *a: skips.append(unchanged(*a)) or skips[-1])
        had_relu = any("relu" in str(n.target) for n in ep.graph.nodes)
        with idle_passes.idle_retraces_skipped():
            res = FuseActivationPass(ep)(ep.graph_module)
        monkeypatch.undo()
        assert had_relu == relu
        assert skips == [skipped]
        assert any("relu" in str(n.target) for n in res.graph_module.graph.nodes) is False


def test_graph_structure_ignores_names_only():
    """graph_structure (what a skipped decomposition is compared by) keeps a graph whose nodes
    were renamed, and tells a re-wired one apart (the control)."""
    gm = _gm()
    before = graph_structure(gm)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            n.name = n.name + "_renamed"
    assert graph_structure(gm) == before
    add = next(n for n in gm.graph.nodes if n.op == "call_function")
    add.args = (add.args[0], 2)
    assert graph_structure(gm) != before


def test_decomposition_runs_when_the_graph_holds_an_op_of_the_table():
    """The guard of idle_decomposition_skipped: a program with an op of the table is
    decomposed (the control), one without only aten.sym_size.int is not."""
    from torch.export import default_decompositions

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x).reshape(x.shape[0], -1)

    x = torch.randn(3, 8)
    dyn = {"x": {0: torch.export.Dim("n", min=2, max=16)}}
    ep = torch.export.export(Lin(), (x,), dynamic_shapes=dyn, strict=False)
    table = default_decompositions()
    assert any(n.target is torch.ops.aten.linear.default for n in ep.graph.nodes)
    assert not idle_passes._nothing_to_decompose(ep, table)  # linear is decomposed by the table
    lowered = ep.run_decompositions(table)
    assert any(n.target is torch.ops.aten.sym_size.int for n in lowered.graph.nodes)
    assert idle_passes._nothing_to_decompose(lowered, table)
    again = lowered.run_decompositions(table).graph_module
    assert graph_structure(again) == graph_structure(lowered.graph_module)
