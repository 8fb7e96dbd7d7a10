"""XNNPACK's preprocess without the re-traces of passes that changed nothing.

XNNPACK's preprocess runs 17 passes over each partition it is given (XNNPACKPassManager).
Thirteen of them edit the graph in their `call` and end with `super().call(graph_module)`:
ExportPass's re-trace of the whole partition with fake tensors, to refresh every node's
metadata after the edits. They run whether or not the pass edited anything, and on a
SmolLM2-135M compile (fp32, max_seq_len 512) those re-traces were most of XNNPACK's
preprocess (168 of 177 s under cProfile), while only two of the 17 passes changed a
partition (the dim-order and clone removals, which are not among the thirteen).

`idle_retraces_skipped()` lets each of those thirteen passes run as written, and answers
its final `super().call()` with the graph as it is when the pass left every node as it
found it (same nodes, targets, arguments): a re-trace of an unchanged graph only recomputes
what the previous pass's re-trace computed. Any edit (a node added, removed or re-wired)
re-traces as before. A pass that only writes node metadata (PropagateCustomMetaPass, the
activation tags) keeps what it wrote, as the re-trace would have carried it over. The .pte
is byte-identical to ExecuTorch's own pipeline (tests/test_lean_lowering.py), and each skipped
re-trace is checked against the real one on a real lowering (tests/test_idle_passes.py).

`idle_decomposition_skipped()` does the same for one whole-program re-trace before any
backend runs. For a partitioner that checks each op (XNNPACK's does), ExecuTorch 1.5.1's
`_gen_edge_manager_for_partitioners` runs three `run_decompositions` over the program: an
empty table (functionalization), the default table less the ops the partitioner keeps, then,
once the kept ops it supports are swapped for opaque stand-ins, the whole default table again
to decompose the kept ops it turned down. When the graph holds no op of that last table, that
re-trace decomposes nothing and rebuilds the same graph: 34 s of the phase's 160 s on
SmolLM2-135M's calibrated compile (bench/README.md). It is then skipped; any op of the table in the graph, and it
runs as before.
"""

from __future__ import annotations

import contextlib

import torch

# passes whose own call() edits and then re-traces through ExportPass.call (XNNPACKPassManager's
# list, ExecuTorch 1.5.1); the others re-trace to do their work (call_operator) or never do
RETRACING_PASSES = (
    "ConvertToUpsampleBilinear2d", "ConvertToLinearPass", "PropagateCustomMetaPass", "ConvertToSDPAPass",
    "FuseBatchNormPass", "DecomposeBatchNorm", "FuseActivationPass", "DecomposeConcatenate",
    "RemoveGetItemPass", "Conv1dUnsqueezePass", "PReLUReshapePass", "ChannelsLastTaggedReshapePass",
    "RemoveRedundantCopyPass",
)


def graph_shape(gm) -> tuple:
    """What a pass's edits change: each node (by identity), its kind, target and arguments."""
    return tuple((n, n.op, n.target, n.args, n.kwargs) for n in gm.graph.nodes)


def _unchanged(pass_, before: tuple, gm) -> bool:
    """True skips pass_'s re-trace. pass_ is unused here: tests wrap this to re-trace with it
    (tests/test_lean_lowering.py) or to count the skips (tests/test_idle_passes.py)."""
    try:
        return graph_shape(gm) == before
    except Exception:  # an argument that cannot be compared: re-trace, as ExecuTorch does
        return False


@contextlib.contextmanager
def idle_retraces_skipped():
    from executorch.backends.xnnpack._passes import XNNPACKPassManager
    from executorch.exir.pass_base import ExportPass
    from torch.fx.passes.infra.pass_base import PassResult

    passes = {p.__name__: p for p in XNNPACKPassManager(None).passes}
    missing = [name for name in RETRACING_PASSES if name not in passes]
    if missing:  # another ExecuTorch: its passes are not the ones read here; change nothing
        yield
        return
    retrace, calls, idle = ExportPass.call, {}, []

    def export_call(self, graph_module):
        if idle and idle[-1] is not None and idle[-1][0] is graph_module and _unchanged(self, idle[-1][1], graph_module):
            return PassResult(graph_module, False)
        return retrace(self, graph_module)

    def wrap(cls):
        own = cls.__dict__["call"]

        def call(self, graph_module):
            idle.append((graph_module, graph_shape(graph_module)) if type(self) is cls else None)
            try:
                return own(self, graph_module)
            finally:
                idle.pop()
        calls[cls] = own
        cls.call = call

    for name in RETRACING_PASSES:
        wrap(passes[name])
    ExportPass.call = export_call
    try:
        yield
    finally:
        ExportPass.call = retrace
        for cls, own in calls.items():
            cls.call = own


def _nothing_to_decompose(program, table) -> bool:
    """Whether no call in the program (or a control-flow subgraph) is an op of `table`, but
    for aten.sym_size.int: the table holds it (a composite op) and its re-trace reads the
    same size again. (tests/test_lean_lowering.py wraps this to run the real decomposition
    beside each skip.)"""
    from executorch.exir.graph_module import contains_any_call_fn_target_op

    try:
        ops = [op for op in table if op is not torch.ops.aten.sym_size.int]
        return not contains_any_call_fn_target_op(program.graph_module, ops)
    except Exception:  # a table or graph this cannot read: decompose, as ExecuTorch does
        return False


@contextlib.contextmanager
def idle_decomposition_skipped():
    import executorch.exir.program._program as prog
    from torch.export import ExportedProgram

    swap = getattr(prog, "_replace_aten_ops_with_transformed_ops", None)
    if swap is None:  # another ExecuTorch: its steps are not the ones read here; change nothing
        yield
        return
    decompose, swapped = ExportedProgram.run_decompositions, []

    def replaced(name, program, partitioner):
        out = swap(name, program, partitioner)
        swapped.append(program)  # the next decomposition of this program is the last one
        return out

    def run_decompositions(self, decomp_table=None, *args, **kwargs):
        if swapped and swapped[-1] is self:
            swapped.pop()
            if decomp_table and not args and not kwargs and _nothing_to_decompose(self, decomp_table):
                return self
        return decompose(self, decomp_table, *args, **kwargs)

    prog._replace_aten_ops_with_transformed_ops, ExportedProgram.run_decompositions = replaced, run_decompositions
    try:
        yield
    finally:
        prog._replace_aten_ops_with_transformed_ops, ExportedProgram.run_decompositions = swap, decompose
