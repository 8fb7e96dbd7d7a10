"""ExecuTorch's aten-to-edge passes, each run of consecutive per-op passes in one re-trace.

ExecuTorch 1.5.1's `_generate_edge_program` runs 14 passes over the whole program, one after
the other, and most are ExportPass subclasses that work one op at a time in `call_operator`:
each re-traces the whole graph with fake tensors to rewrite a few ops (6-7 s apiece on
SmolLM2-135M's 4300-node forward, bench/README.md). Two runs of them are consecutive:

    NormalizeTransposePass, ReplaceBrokenOpsWithFunctionalOpsPass, ScalarToTensorPass,
    SymToTensorPass                                  (four re-traces)
    RemoveMixedTypeOperators, OpReplacePass, MemoryFormatOpsPass     (three re-traces)

A class that inherits a run's passes in order chains their `call_operator`s through
`super()`: the first pass's rewrite of an op is handed to the second pass's `call_operator`,
and so on, and only the last one emits the node. That is the op-by-op composition the
sequential passes compute, in one re-trace per run instead of seven in all. The passes
between the runs (asserts and view copies before; sym sizes, no-ops, empty tensors, copies and
quantize folds, which edit the graph in `call`) run as before.

`fused_edge_passes()` installs it while ExecuTorch lowers; another ExecuTorch, whose pass list
is not the one read here, changes nothing. The .pte is byte-identical to ExecuTorch's own
pipeline (tests/test_lean_lowering.py, float and int8da-int8w).
"""

from __future__ import annotations

import contextlib

# the pre-op-replace passes of ExecuTorch 1.5.1 (exir/passes/__init__.py), in order
PRE_PASSES = ("ReplaceSymSizeOpPass", "NormalizeTransposePass", "ReplaceBrokenOpsWithFunctionalOpsPass",
              "ScalarToTensorPass", "SymToTensorPass", "RemoveNoopPass", "PruneEmptyTensorsPass", "RemoveToCopyPass",
              "FoldRedundantDequantizeQuantizePass", "RemoveMixedTypeOperators")
FIRST_RUN = slice(1, 5)  # NormalizeTranspose .. SymToTensor


def fuse(passes: list):
    """One pass doing `passes` in order, op by op, in one re-trace."""
    from executorch.exir.pass_base import ExportPass

    classes = tuple(type(p) for p in passes)
    if not all(issubclass(c, ExportPass) for c in classes):
        raise TypeError(f"only ExportPass subclasses chain through call_operator: {classes}")
    return type("+".join(c.__name__ for c in classes), classes, {})()


class _Done:
    """MemoryFormatOpsPass's place once it is fused into the pass before it."""

    def __call__(self, graph_module):
        from torch.fx.passes.infra.pass_base import PassResult

        return PassResult(graph_module, False)


@contextlib.contextmanager
def fused_edge_passes():
    import executorch.exir.program._program as prog
    from torch.fx.passes.infra.pass_manager import pass_result_wrapper

    orig_passes, orig_replace, orig_memory = prog._get_aten_to_edge_passes, prog.OpReplacePass, prog.MemoryFormatOpsPass
    try:
        probe, _ = orig_passes(_Config())
    except Exception:  # another ExecuTorch, reading more of its config: change nothing
        probe = ()
    if tuple(type(getattr(f, "__wrapped__", f)).__name__ for f in probe) != PRE_PASSES:
        yield  # another ExecuTorch: change nothing
        return
    pending = []  # the fused RemoveMixedType+OpReplace+MemoryFormat pass, once pre-passes were asked for

    def aten_to_edge_passes(config):
        pre, post = orig_passes(config)
        inner = [getattr(f, "__wrapped__", f) for f in pre]
        pre = pre[:FIRST_RUN.start] + [pass_result_wrapper(fuse(inner[FIRST_RUN]))] + pre[FIRST_RUN.stop:-1]
        pending.append((inner[-1], config._skip_dim_order))
        return pre, post

    def op_replace():
        if not pending or pending[-1] is None:  # not after aten_to_edge_passes: nothing was taken out
            return orig_replace()
        mixed, skip_dim_order = pending.pop()
        if skip_dim_order:  # no MemoryFormatOpsPass follows: fuse the two
            return fuse([mixed, orig_replace()])
        pending.append(None)  # MemoryFormatOpsPass's turn is taken
        return fuse([mixed, orig_replace(), orig_memory()])

    def memory_format():
        if pending and pending[-1] is None:
            pending.pop()
            return _Done()
        return orig_memory()

    prog._get_aten_to_edge_passes, prog.OpReplacePass, prog.MemoryFormatOpsPass = (
        aten_to_edge_passes, op_replace, memory_format)
    try:
        yield
    finally:
        prog._get_aten_to_edge_passes, prog.OpReplacePass, prog.MemoryFormatOpsPass = (
            orig_passes, orig_replace, orig_memory)


class _Config:
    """What _get_aten_to_edge_passes reads of an EdgeCompileConfig (nothing, in 1.5.1)."""

    _skip_dim_order = False
