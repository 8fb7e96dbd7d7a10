"""LiteRT's attention reads each KV cache as stored (RowCacheAttention(batched_einsum=True)):
in the decode signature no BATCH_MATMUL reads a RESHAPE of a cache-sized tensor, the copy of
the whole cache that the rank-3 form makes.
Control: the rank-3 bmm form (batched_einsum=False) puts such a copy before each of the two
matmuls of every layer, so the count can fail. That both forms compute what the reference
does is checked in test_tflite.py and test_flows.py.
And each matmul takes its cache as the transposed right operand ([N, K], adj_y): XNNPACK packs
that operand on every call, and packs [L, hd] values (adj_y false) with a scalar loop. Control:
V caches by row (values_by_column=False) give adj_y false on every V matmul."""

import dataclasses

import pytest

pytest.importorskip("litert_torch")

from slmc import api  # noqa: E402
from slmc.compiler.lowering.attention import RowCacheAttention  # noqa: E402
from slmc.targets.tflite import target as T  # noqa: E402

P = 8


def _decode_matmuls(path):
    """(decode subgraph, its BATCH_MATMULs, each op's builtin code, the schema module)."""
    from ai_edge_litert import schema_py_generated as S

    mt = S.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    sig = next(s for s in mt.signatureDefs if s.signatureKey == b"decode")
    sg = mt.subgraphs[sig.subgraphIndex]
    code = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in mt.operatorCodes]
    bmm = [op for op in sg.operators if code[op.opcodeIndex] == S.BuiltinOperator.BATCH_MATMUL]
    return sg, bmm, lambda op: code[op.opcodeIndex], S


def _cache_copies(path) -> tuple[int, int]:
    """(BATCH_MATMULs, of which read a RESHAPE of a cache-sized tensor) in the decode signature."""
    sg, bmm, code, S = _decode_matmuls(path)
    cache_shapes = {tuple(sg.tensors[i].shape) for i in sg.inputs if b"kv_cache" in sg.tensors[i].name}
    assert cache_shapes
    made_by = {t: op for op in sg.operators for t in op.outputs}
    copies = 0
    for op in bmm:
        for t in op.inputs:
            src = made_by.get(t)
            if src is not None and code(src) == S.BuiltinOperator.RESHAPE \
                    and tuple(sg.tensors[src.inputs[0]].shape) in cache_shapes:
                copies += 1
    return len(bmm), copies


def _cache_operands(path) -> list[tuple[str, bool]]:
    """(k or v, adj_y) for each decode BATCH_MATMUL whose right operand is a cache as written."""
    sg, bmm, _, _ = _decode_matmuls(path)
    out = []
    for op in bmm:
        name = sg.tensors[op.inputs[1]].name.decode()
        if "kv_cache_k_" in name or "kv_cache_v_" in name:
            out.append(("k" if "kv_cache_k_" in name else "v", bool(op.builtinOptions.adjY)))
    return out


def test_each_cache_is_the_transposed_right_operand(tiny_llama_dir, monkeypatch):
    model = api.load(str(tiny_llama_dir))
    path, _ = T.convert(model, P)
    assert sorted(_cache_operands(path)) == [("k", True)] * model.n_layers + [("v", True)] * model.n_layers
    by_row = dataclasses.replace(T.COMPONENTS, attention=dataclasses.replace(T.COMPONENTS.attention,
                                                                             values_by_column=False))
    monkeypatch.setattr(T, "COMPONENTS", by_row)  # control: V caches [1, kvh, L, hd]
    path, _ = T.convert(model, P)
    assert sorted(_cache_operands(path)) == [("k", True)] * model.n_layers + [("v", False)] * model.n_layers


def test_attention_reads_the_cache_without_a_copy(tiny_llama_dir, monkeypatch):
    model = api.load(str(tiny_llama_dir))
    path, _ = T.convert(model, P)
    n_bmm, copies = _cache_copies(path)
    assert n_bmm == 2 * model.n_layers and copies == 0
    rank3 = dataclasses.replace(T.COMPONENTS, attention=RowCacheAttention(write_rows=T._dus_rows))
    monkeypatch.setattr(T, "COMPONENTS", rank3)  # control: the rank-3 bmm form
    path, _ = T.convert(model, P)
    assert _cache_copies(path) == (2 * model.n_layers, 2 * model.n_layers)
