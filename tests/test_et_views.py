"""ExecuTorch edge rewrite (targets/executorch/views.py): a view with one symbolic size names it
-1, so XNNPACK takes it; same results at every length; two symbolic sizes are left alone."""

import pytest
import torch

pytest.importorskip("executorch")

from slmc.targets.executorch.views import infer_view_dims  # noqa: E402


class Heads(torch.nn.Module):
    """linear -> split into heads (a view of a dynamic length) -> linear: one layer's shape."""

    def __init__(self, two_symbolic: bool = False):
        super().__init__()
        self.a, self.b, self.two = torch.nn.Linear(64, 64), torch.nn.Linear(16, 16), two_symbolic

    def forward(self, x):
        y = self.a(x)
        # reshape, as the lowered decoder's heads: torch.export resolves its -1 to a symbol
        y = y.reshape(y.shape[0], -1, 4, 16) if self.two else y.reshape(1, -1, 4, 16)
        return self.b(y)


def _edge(module, batch_dynamic=False):
    from torch.export import Dim

    from executorch.exir import EdgeCompileConfig, to_edge

    T = Dim("T", min=1, max=32)
    shapes = ({0: Dim("B", min=1, max=4), 1: T},) if batch_dynamic else ({1: T},)
    x = torch.randn(2 if batch_dynamic else 1, 3, 64)
    ep = torch.export.export(module.eval(), (x,), dynamic_shapes=shapes, strict=False)
    return to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False))


def _views(edge):
    return [list(n.args[1]) for n in edge.exported_program().graph.nodes
            if n.op == "call_function" and "view_copy" in str(n.target)]


def test_one_symbolic_size_becomes_minus_one_with_the_same_results():
    torch.manual_seed(0)
    assert any(not isinstance(d, int) for v in _views(_edge(Heads())) for d in v)  # as exported
    edge = _edge(before_module := Heads()).transform([infer_view_dims])
    assert [1, -1, 4, 16] in _views(edge)
    assert all(isinstance(d, int) for v in _views(edge) for d in v)
    assert not [n for n in edge.exported_program().graph.nodes if "sym_size" in str(n.target)]
    old, new = _edge(before_module).exported_program().module(), edge.exported_program().module()
    for t in (1, 5, 32):
        x = torch.randn(1, t, 64)
        assert torch.equal(new(x), old(x))


def test_only_views_with_one_unknown_size_change():
    edge = _edge(Heads(two_symbolic=True), batch_dynamic=True)
    before = _views(edge)
    assert infer_view_dims(edge.exported_program().graph_module).modified
    for old, new in zip(before, _views(edge)):
        symbols = sum(not isinstance(d, int) for d in old)
        rewritable = symbols == 1 and -1 not in old  # else -1 would not name one size
        assert (-1 in new and new != old) if rewritable else new == old, (old, new)
    assert any(sum(not isinstance(d, int) for d in v) == 2 for v in before)


def _calls(edge) -> int:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    lowered = edge.to_backend(XnnpackPartitioner())
    return sum("call_delegate" in str(n.target) for n in lowered.exported_program().graph.nodes)


class Merge(torch.nn.Module):
    """heads back to one row per position between two linears (attention's output)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        y = self.a(x).view(1, -1, 4, 16).permute(0, 2, 1, 3)
        return self.b(torch.relu(y).permute(0, 2, 1, 3).reshape(1, -1, 64))


def _symbolic_merge():
    """Merge's edge graph with its [1, -1, 64] view written [1, T, 64], as torch.export writes
    it in the lowered decoder (the tiny Llama's graph had 3 such views per layer)."""
    edge = _edge(Merge())
    g = edge.exported_program().graph
    T = next(n for n in g.nodes if "sym_size" in str(n.target))
    view = next(n for n in g.nodes if "view_copy" in str(n.target) and list(n.args[1]) == [1, -1, 64])
    view.args = (view.args[0], [1, T, 64])
    edge.exported_program().graph_module.recompile()
    return edge


def test_xnnpack_takes_the_layer_in_one_call():
    """With a symbolic size the view runs in the portable kernels between two XNNPACK calls (the
    control); rewritten, XNNPACK takes the whole graph in one call."""
    assert _calls(_symbolic_merge()) == 2
    assert _calls(_symbolic_merge().transform([infer_view_dims])) == 1
