"""The guard of idle_passes.py (an XNNPACK pass that changed nothing skips its re-trace): it
sees every kind of edit, and a pass that edits still re-traces. That a skipped re-trace gives
the real one's graph, and the .pte ExecuTorch's bytes, is checked on a real lowering in
tests/test_lean_lowering.py."""

import pytest
import torch

pytest.importorskip("executorch")

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


def test_a_pass_that_edits_still_retraces():
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

    for relu, skipped in ((True, False), (False, True)):
        ep = edge(relu)
        n = len(idle_passes.SKIPPED)
        had_relu = any("relu" in str(n.target) for n in ep.graph.nodes)
        with idle_passes.idle_retraces_skipped():
            res = FuseActivationPass(ep)(ep.graph_module)
        assert had_relu == relu
        assert (len(idle_passes.SKIPPED) > n) == skipped
        assert any("relu" in str(n.target) for n in res.graph_module.graph.nodes) is False
