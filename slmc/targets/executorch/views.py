"""Edge-graph rewrite before partitioning: a view with one symbolic size names it -1.

torch.export records `x.view(1, -1, h, hd)` with the inferred size resolved to a symbol
(`[1, s0, h, hd]`) when the sequence length is dynamic, and XNNPACK's static reshape refuses
a symbolic size (it takes one -1): each such view ran in the portable kernels and cut its
layer into separate delegate calls (3 per layer on a tiny Llama, besides the KV-cache
writes). With one symbolic size and every other size a positive constant, -1 names the same
size (the element count fixes it): the same op, now one XNNPACK can take.

Before:                                    After:
  s0 = sym_size(x, 1)                        view_copy(getitem, [1, -1, 4, 16])
  view_copy(getitem, [1, s0, 4, 16])
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassResult


def _drop_unused_sizes(graph: torch.fx.Graph, nodes: list) -> None:
    """Erase size computations (SymInt values, e.g. sym_size, s0 * 2) nothing uses any more."""
    nodes, erased = list(nodes), set()
    while nodes:
        n = nodes.pop()
        if (isinstance(n, torch.fx.Node) and n not in erased and n.op == "call_function"
                and not n.users and isinstance(n.meta.get("val"), torch.SymInt)):
            nodes.extend(n.all_input_nodes)
            graph.erase_node(n)
            erased.add(n)


def infer_view_dims(gm: torch.fx.GraphModule) -> PassResult:
    from executorch.exir.dialects._ops import ops as exir_ops

    view, freed = exir_ops.edge.aten.view_copy.default, []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not view:
            continue
        shape = list(n.args[1])
        symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(symbolic) != 1 or not all(d > 0 for d in shape if isinstance(d, int)):
            continue
        freed.append(shape[symbolic[0]])
        shape[symbolic[0]] = -1
        n.args = (n.args[0], shape, *n.args[2:])
    if freed:
        _drop_unused_sizes(gm.graph, freed)
        gm.recompile()
    return PassResult(gm, bool(freed))
