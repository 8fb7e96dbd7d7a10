"""ExecuTorch lowering without its default weight copies (slmc/targets/executorch/lean.py)
writes the same bytes as ExecuTorch's own pipeline.

lean_lowering shares the constants ExecuTorch would clone (the tied table read by two
partitions, each partition's weights before backend preprocess) and spills packed weights to
files. A weight that a backend pass wrote in place, or a spilled blob read back wrong, would
change the .pte or model.ptd; the comparison catches that, as the control shows (one weight
changed by one ulp changes the bytes).
"""

import contextlib

import pytest
import torch

from helpers import graph_structure
from slmc import api
from slmc.compiler.importers import load_model
from slmc.compiler.lowering import LoweringSpec, export_decoder
from slmc.targets.base import scratch_file
from slmc.targets.executorch import fused_passes

VOCAB, HIDDEN = 1024, 64


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    from tiny import save_hf_model

    d = tmp_path_factory.mktemp("lean") / "tied"
    save_hf_model({**api.tiny_llama_config(), "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 1}, d)
    return d


class _Plain:
    """ExecuTorch's own pipeline: nothing shared or spilled."""

    def __call__(self, data):
        return data

    @staticmethod
    def join(cord, name):  # ExecuTorch's own bytes(cord), as a file like lean's
        path = scratch_file(name)
        path.write_bytes(bytes(cord))
        return path


def lower(model_dir, lean: bool, monkeypatch, nudge: bool = False, recipe: str | None = None):
    import slmc.targets.executorch.lean as lean_mod
    import slmc.targets.executorch.program as program

    ir = load_model(model_dir, max_seq_len=32)
    if recipe:  # its round-to-nearest passes (no calibration)
        from slmc._api.models import parse_passes, run_passes
        from slmc.recipes import RECIPES

        ir, _ = run_passes(ir, parse_passes(RECIPES[recipe].passes))
    if nudge:  # the control: one weight one ulp up
        w = ir.blocks[0].attn.o.weight.data
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    spilled, viewed, written, known, retraces, decompositions, fused = [], [], [], [], [], [], []
    if lean:
        fuse = fused_passes.fuse
        monkeypatch.setattr(fused_passes, "fuse", lambda passes: fused.append(len(passes)) or fuse(passes))
        monkeypatch.setattr(lean_mod, "SPILL_MIN_BYTES", 1024)  # tiny weights spill too
        monkeypatch.setattr(lean_mod, "CHUNK_BYTES", 4096)  # and are read in several chunks
        orig_write = lean_mod.Spill._write_paged

        def write_paged(self, raw):
            written.append(len(raw))
            return orig_write(self, raw)

        monkeypatch.setattr(lean_mod.Spill, "_write_paged", write_paged)
        orig_sha = lean_mod.Spill.sha256

        def sha256(self, data=b"", **kw):
            out = orig_sha(self, data, **kw)
            known.append(isinstance(out, lean_mod._Digest))  # not read back to be hashed
            return out

        monkeypatch.setattr(lean_mod.Spill, "sha256", sha256)
        orig = lean_mod.Spill.__call__

        def spill(self, data):
            out = orig(self, data)
            spilled.append(out is not data)
            return out

        monkeypatch.setattr(lean_mod.Spill, "__call__", spill)
        orig_bytes = lean_mod.Spill.bytes_of

        def bytes_of(self, x=b"", *rest):
            out = orig_bytes(self, x, *rest)
            viewed.append(isinstance(out, memoryview))  # a weight's memory went through a file
            return out

        monkeypatch.setattr(lean_mod.Spill, "bytes_of", bytes_of)
        from executorch.exir.pass_base import ExportPass

        import slmc.targets.executorch.idle_passes as idle

        retrace, unchanged = ExportPass.call, idle._unchanged

        def checked(pass_, before, gm):  # each skipped re-trace, against the real one
            same = unchanged(pass_, before, gm)
            if same:
                retraces.append(retrace(pass_, gm).graph_module.code == gm.code)
            return same

        monkeypatch.setattr(idle, "_unchanged", checked)
        real_decompose, skip = torch.export.ExportedProgram.run_decompositions, idle._nothing_to_decompose

        def checked_decomposition(program, table):  # each skipped decomposition, against the real one
            same = skip(program, table)
            if same:
                real = real_decompose(program, table).graph_module
                retraces.append(graph_structure(real) == graph_structure(program.graph_module))
                decompositions.append(same)
            return same

        monkeypatch.setattr(idle, "_nothing_to_decompose", checked_decomposition)
    else:
        monkeypatch.setattr(program, "lean_lowering", lambda backend: contextlib.nullcontext(_Plain()))
    ep = export_decoder(ir, LoweringSpec(), dynamic=True)
    spec = program.ExecuTorchSpec()
    pte, _, ptd = program.to_pte_and_data(ep, spec, program.runner_metadata(ir), tied=program.tied_table(ir, "xnnpack"))
    monkeypatch.undo()
    return (pte.read_bytes(), ptd.read_bytes() if ptd is not None else None, sum(spilled), sum(viewed),
            sum(n > 4096 for n in written), len(written), sum(known), retraces, decompositions, len(fused))


@pytest.fixture(scope="module")
def reference(tied_dir):
    mp = pytest.MonkeyPatch()
    try:
        return lower(tied_dir, False, mp)[:2]
    finally:
        mp.undo()


def test_lean_lowering_writes_executorchs_bytes(tied_dir, reference, monkeypatch):
    pte, ptd, n, viewed, chunked, written, known, retraces, decompositions, fused = lower(tied_dir, True, monkeypatch)
    assert n >= 3  # the tied table, and packed block weights, went through files
    assert viewed >= 3  # and were never copied into bytes (Spill.bytes_of)
    assert chunked >= 1  # some were read in several chunks
    assert written < viewed  # XNNPACK's second ask for a weight maps the file already written
    assert known >= 3  # and its hash of the mapping is the digest taken while writing
    assert ptd is not None  # the tied table sits in model.ptd, once
    # XNNPACK passes that changed nothing skipped their re-trace (idle_passes.py), and the
    # forward's last whole-program decomposition, which found nothing to decompose, was
    # skipped (idle_decomposition_skipped); each checked here against the real run's graph
    assert len(retraces) >= 14 and all(retraces), retraces
    assert decompositions == [True]
    # ExecuTorch's per-op edge passes ran as two fused re-traces per program (fused_passes.py)
    assert fused >= 2
    assert (pte, ptd) == reference


def test_lean_lowering_writes_executorchs_bytes_for_8da8w(tied_dir, monkeypatch):
    """The same for an int8da-int8w program (quantized linears, int8 embedding rows): its
    dynamic-quantization ops go through the fused edge passes and the skipped decomposition."""
    mp = pytest.MonkeyPatch()
    try:
        ref = lower(tied_dir, False, mp, recipe="int8da-int8w")[:2]
    finally:
        mp.undo()
    out = lower(tied_dir, True, monkeypatch, recipe="int8da-int8w")
    assert out[-2] == [True] and out[-1] >= 2, out[-2:]
    assert out[:2] == ref


@pytest.mark.slow
def test_control_one_ulp_changes_the_bytes(tied_dir, reference, monkeypatch):
    nudged = lower(tied_dir, True, monkeypatch, nudge=True)
    assert nudged[:2] != reference


def test_bitset_dependency_viewer_answers_like_executorchs(tied_dir):
    """The partitioner's dependency viewer (lean.py) gives every node of an edge graph the
    same transitive downstream and upstream nodes as ExecuTorch's own set-based one."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.exir.backend.canonical_partitioners.group_partitioner import _DependencyViewer

    from slmc.targets.executorch.lean import _BitsetDependencyViewer

    ir = load_model(tied_dir, max_seq_len=32)
    gm = to_edge(export_decoder(ir, LoweringSpec(), dynamic=True),
                 compile_config=EdgeCompileConfig(_check_ir_validity=False)).exported_program().graph_module
    theirs, ours = _DependencyViewer(gm), _BitsetDependencyViewer(gm)
    nodes = list(gm.graph.nodes)
    assert len(nodes) > 50
    for n in nodes:
        down = ours.downstreams_of(n)
        assert set(down) == theirs.downstreams_of(n) and len(down) == len(theirs.downstreams_of(n))
        assert set(ours.upstreams_of(n)) == theirs.upstreams_of(n)
    first, last = nodes[0], nodes[-1]
    assert last not in ours.downstreams_of(last)
    assert (last in ours.downstreams_of(first)) == (last in theirs.downstreams_of(first))


def test_merge_check_answers_like_executorchs(tied_dir):
    """GroupBasedPartitioner's cycle check before merging two partitions (lean.py's
    _can_merge_partitions, one AND per outside user) answers as ExecuTorch's own does, for
    pairs of partitions of an edge graph that can and cannot merge."""
    from types import SimpleNamespace

    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.exir.backend.canonical_partitioners.group_partitioner import (
        GroupBasedPartitioner, _DependencyViewer)

    from slmc.targets.executorch.lean import _BitsetDependencyViewer, _can_merge_partitions

    ir = load_model(tied_dir, max_seq_len=32)
    gm = to_edge(export_decoder(ir, LoweringSpec(), dynamic=True),
                 compile_config=EdgeCompileConfig(_check_ir_validity=False)).exported_program().graph_module
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    parts = {i: SimpleNamespace(nodes=dict.fromkeys(ops[i * 3:i * 3 + 3])) for i in range(len(ops) // 3)}
    theirs = SimpleNamespace(dependency_viewer=_DependencyViewer(gm))
    ours = SimpleNamespace(dependency_viewer=_BitsetDependencyViewer(gm))
    answers = []
    for a in range(0, len(parts), 3):
        for b in range(a + 1, min(a + 12, len(parts))):
            want = GroupBasedPartitioner._can_merge_partitions(theirs, a, b, parts)
            assert _can_merge_partitions(ours, a, b, parts) == want, (a, b)
            answers.append(want)
    assert True in answers and False in answers  # both kinds of pair were asked
