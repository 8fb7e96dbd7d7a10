"""fused_passes.py: consecutive per-op ExecuTorch passes run in one re-trace give what running
them one after the other gives, in order; on another ExecuTorch nothing is changed. That the
.pte stays ExecuTorch's own bytes is checked in tests/test_lean_lowering.py."""

import pytest
import torch

pytest.importorskip("executorch")

from executorch.exir import EdgeCompileConfig, to_edge  # noqa: E402
from executorch.exir.dialects._ops import ops as exir_ops  # noqa: E402
from executorch.exir.pass_base import ExportPass  # noqa: E402

from slmc.targets.executorch import fused_passes  # noqa: E402


class AddToSub(ExportPass):
    def call_operator(self, op, args, kwargs, meta):
        if op == exir_ops.edge.aten.add.Tensor:
            op = exir_ops.edge.aten.sub.Tensor
        return super().call_operator(op, args, kwargs, meta)


class SubToMul(ExportPass):
    def call_operator(self, op, args, kwargs, meta):
        if op == exir_ops.edge.aten.sub.Tensor:
            op = exir_ops.edge.aten.mul.Tensor
        return super().call_operator(op, args, kwargs, meta)


def _edge_gm():
    class M(torch.nn.Module):
        def forward(self, x, y):
            return (x + y) - y

    ep = torch.export.export(M(), (torch.randn(3), torch.randn(3)), strict=False)
    return to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).exported_program().graph_module


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("order", [(AddToSub, SubToMul), (SubToMul, AddToSub)])
def test_fused_passes_give_the_sequence_in_order(order):
    """The order matters here (add -> sub -> mul one way, add -> sub the other): the fused
    pass gives what the passes give one after the other, each way."""
    gm = _edge_gm()
    for cls in order:
        gm = cls()(gm).graph_module
    fused = fused_passes.fuse([cls() for cls in order])(_edge_gm()).graph_module
    assert _ops(fused) == _ops(gm)
    # the control: the two orders differ, so a fusion that ran them the other way would fail
    other = _edge_gm()
    for cls in order[::-1]:
        other = cls()(other).graph_module
    assert _ops(other) != _ops(gm)


def test_only_export_passes_fuse():
    with pytest.raises(TypeError):
        fused_passes.fuse([AddToSub(), object()])


def test_another_executorch_is_left_alone(monkeypatch):
    """When ExecuTorch's pass list is not the one fused_passes was written for, nothing is
    replaced (the control: with the list it knows, the functions are replaced)."""
    import executorch.exir.program._program as prog

    orig = prog._get_aten_to_edge_passes
    with fused_passes.fused_edge_passes():
        assert prog._get_aten_to_edge_passes is not orig
    assert prog._get_aten_to_edge_passes is orig
    monkeypatch.setattr(fused_passes, "PRE_PASSES", fused_passes.PRE_PASSES[:-1])
    with fused_passes.fused_edge_passes():
        assert prog._get_aten_to_edge_passes is orig


def test_op_replace_alone_is_executorchs():
    """OpReplacePass asked for without the pre-passes first (nothing taken out of them) is
    ExecuTorch's own; after them, it carries RemoveMixedTypeOperators and MemoryFormatOpsPass,
    whose own place is then empty."""
    import executorch.exir.program._program as prog

    with fused_passes.fused_edge_passes():
        assert type(prog.OpReplacePass()).__name__ == "OpReplacePass"
        pre, _ = prog._get_aten_to_edge_passes(EdgeCompileConfig(_check_ir_validity=False))
        names = [type(getattr(f, "__wrapped__", f)).__name__ for f in pre]
        assert "RemoveMixedTypeOperators" not in names and len(names) == len(fused_passes.PRE_PASSES) - 4
        assert type(prog.OpReplacePass()).__name__ == "RemoveMixedTypeOperators+OpReplacePass+MemoryFormatOpsPass"
        gm = _edge_gm()
        assert prog.MemoryFormatOpsPass()(gm).graph_module is gm
        assert type(prog.MemoryFormatOpsPass()).__name__ == "MemoryFormatOpsPass"
