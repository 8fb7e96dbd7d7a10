"""XNNPACK bmms read a transposed right operand as stored (slmc/targets/executorch/bmm_operands.py).

The flag is read back from the .pte's XNNPACK graphs (decompiled with ExecuTorch's own flatc and
XNNPACK's schema), and the pip runtime's results are compared with torch's. The control sets the
flag on a bmm whose right operand is the transposed copy: the runtime then computes q @ k, not
q @ k^T, so a runtime that ignored the flag could not pass the first test.
"""

import contextlib
import json
import tempfile
from pathlib import Path

import torch

from slmc.targets.executorch.bmm_operands import XNN_FLAG_TRANSPOSE_B, transposed_operands


def xnn_graphs(pte: Path) -> list[dict]:
    """Each XNNPACK delegate's graph in the .pte, as flatc's JSON of XNNPACK's schema."""
    import executorch.backends.xnnpack.serialization.xnnpack_graph_serialize as xser
    from executorch.exir._serialize._flatbuffer import _flatc_decompile
    from executorch.exir._serialize._program import deserialize_pte_binary

    schema = str(Path(xser.__file__).with_name("schema.fbs"))
    program, out = deserialize_pte_binary(Path(pte).read_bytes()).program, []
    for plan in program.execution_plan:
        for d in plan.delegates:
            if d.id != "XnnpackBackend":
                continue
            data = bytes(program.backend_delegate_data[d.processed.index].data)
            h = xser.XNNHeader.from_bytes(data[:xser.XNNHeader.EXPECTED_LENGTH])
            with tempfile.TemporaryDirectory() as t:
                Path(t, "g.bin").write_bytes(data[h.flatbuffer_offset:h.flatbuffer_offset + h.flatbuffer_size])
                _flatc_decompile(t, schema, str(Path(t, "g.bin")))
                out.append(json.loads(Path(t, "g.json").read_text()))
    return out


def nodes(graphs: list[dict], kind: str) -> list[dict]:
    return [n["xnode_union"] for g in graphs for n in g["xnodes"] if n["xnode_union_type"] == kind]


class Scores(torch.nn.Module):
    def forward(self, q, k):
        return torch.bmm(q, k.transpose(1, 2))


class ScoresAndCopy(torch.nn.Module):
    """The transposed copy has a second reader: it must still be made."""

    def forward(self, q, k):
        t = k.transpose(1, 2)
        return torch.bmm(q, t), t * 2


def lower_and_run(module, args, tmp_path, patched: bool):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    ep = torch.export.export(module, args)
    with transposed_operands() if patched else contextlib.nullcontext():
        prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    pte = tmp_path / f"m{int(patched)}.pte"
    pte.write_bytes(prog.buffer)
    return pte, Runtime.get().load_program(str(pte)).load_method("forward").execute(list(args))


def test_scores_read_keys_as_stored_and_match_torch(tmp_path):
    q, k = torch.randn(3, 5, 64), torch.randn(3, 40, 64)
    pte, (out,) = lower_and_run(Scores(), (q, k), tmp_path, patched=True)
    graphs = xnn_graphs(pte)
    assert [b["flags"] for b in nodes(graphs, "XNNBatchMatrixMultiply")] == [XNN_FLAG_TRANSPOSE_B]
    assert nodes(graphs, "XNNStaticTranspose") == []
    torch.testing.assert_close(out, q @ k.transpose(1, 2), rtol=1e-5, atol=1e-5)
    stock, _ = lower_and_run(Scores(), (q, k), tmp_path, patched=False)  # what ExecuTorch writes
    assert [b["flags"] for b in nodes(xnn_graphs(stock), "XNNBatchMatrixMultiply")] == [0]
    assert len(nodes(xnn_graphs(stock), "XNNStaticTranspose")) == 1


def test_a_transpose_with_another_reader_is_kept(tmp_path):
    q, k = torch.randn(2, 4, 16), torch.randn(2, 8, 16)
    pte, (scores, copy) = lower_and_run(ScoresAndCopy(), (q, k), tmp_path, patched=True)
    graphs = xnn_graphs(pte)
    assert [b["flags"] for b in nodes(graphs, "XNNBatchMatrixMultiply")] == [0]
    torch.testing.assert_close(scores, q @ k.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copy, 2 * k.transpose(1, 2))


def test_control_the_flag_on_the_transposed_copy_computes_something_else(tmp_path, monkeypatch):
    """The runtime honours the flag: set on a bmm fed the copy, q @ k comes out, not q @ k^T."""
    q, k = torch.randn(2, 4, 16), torch.randn(2, 16, 16)
    from executorch.backends.xnnpack.operators.node_visitor import _node_visitor_dict
    from executorch.backends.xnnpack.serialization.xnnpack_graph_schema import XNNBatchMatrixMultiply

    visitor = _node_visitor_dict["aten.bmm.default"]
    orig = visitor.define_node

    def flag_all(self, node, xnn_graph, vals_to_ids, debug_handle):
        orig(self, node, xnn_graph, vals_to_ids, debug_handle)
        last = xnn_graph.xnodes[-1].xnode_union
        assert isinstance(last, XNNBatchMatrixMultiply)
        last.flags = XNN_FLAG_TRANSPOSE_B

    monkeypatch.setattr(visitor, "define_node", flag_all)
    # ExecuTorch's own serialization (transpose kept), with every bmm's flag set
    _, (out,) = lower_and_run(Scores(), (q, k), tmp_path, patched=False)
    torch.testing.assert_close(out, q @ k, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, q @ k.transpose(1, 2), atol=1e-3)


def test_every_attention_bmm_reads_its_cache_as_stored_in_the_8da4w_artifact(tiny_et_8da4w, tmp_path):
    """Per layer: the scores read K [kvh, L, hd] and p @ V reads V by column [kvh, hd, L], both
    with the flag; the manifest names V's axes."""
    folder, manifest = tiny_et_8da4w(tmp_path / "a")
    flags = [b["flags"] for b in nodes(xnn_graphs(folder / "model.pte"), "XNNBatchMatrixMultiply")]
    assert flags == [XNN_FLAG_TRANSPOSE_B] * (2 * manifest["model"]["layers"])
    assert manifest["kv_cache"]["v_axes"] == "[1, kv_heads, head_dim, max_len]"

