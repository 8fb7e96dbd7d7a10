"""LiteRT's attention reads each KV cache as stored (RowCacheAttention(batched_einsum=True)):
in the decode signature no BATCH_MATMUL reads a RESHAPE of a cache-sized tensor, the copy of
the whole cache that the rank-3 form makes.
Control: the rank-3 bmm form (batched_einsum=False) puts such a copy before each of the two
matmuls of every layer, so the count can fail. That both forms compute what the reference
does is checked in test_tflite.py and test_flows.py."""

import dataclasses

import pytest

pytest.importorskip("litert_torch")

from slmc import api  # noqa: E402
from slmc.compiler.lowering.attention import RowCacheAttention  # noqa: E402
from slmc.targets.tflite import target as T  # noqa: E402

P = 8


def _cache_copies(path) -> tuple[int, int]:
    """(BATCH_MATMULs, of which read a RESHAPE of a cache-sized tensor) in the decode signature."""
    from ai_edge_litert import schema_py_generated as S

    mt = S.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    sig = next(s for s in mt.signatureDefs if s.signatureKey == b"decode")
    sg = mt.subgraphs[sig.subgraphIndex]
    code = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in mt.operatorCodes]
    cache_shapes = {tuple(sg.tensors[i].shape) for i in sg.inputs if b"kv_cache" in sg.tensors[i].name}
    assert cache_shapes
    made_by = {t: op for op in sg.operators for t in op.outputs}
    bmm = [op for op in sg.operators if code[op.opcodeIndex] == S.BuiltinOperator.BATCH_MATMUL]
    copies = 0
    for op in bmm:
        for t in op.inputs:
            src = made_by.get(t)
            if src is not None and code[src.opcodeIndex] == S.BuiltinOperator.RESHAPE \
                    and tuple(sg.tensors[src.inputs[0]].shape) in cache_shapes:
                copies += 1
    return len(bmm), copies


def test_attention_reads_the_cache_without_a_copy(tiny_llama_dir, monkeypatch):
    model = api.load(str(tiny_llama_dir))
    path, _ = T.convert(model, P)
    n_bmm, copies = _cache_copies(path)
    assert n_bmm == 2 * model.n_layers and copies == 0
    rank3 = dataclasses.replace(T.COMPONENTS, attention=RowCacheAttention(write_rows=T._dus_rows))
    monkeypatch.setattr(T, "COMPONENTS", rank3)  # control: the rank-3 bmm form
    path, _ = T.convert(model, P)
    assert _cache_copies(path) == (2 * model.n_layers, 2 * model.n_layers)
