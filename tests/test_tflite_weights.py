"""LiteRT weights around the converter (slmc/targets/tflite/weights.py): lifting the matrices
to signature inputs and splicing them back as shared constants gives the same model as
converting them as constants: the same ops on the same shapes, the same signatures, the same
outputs bit for bit; with quantized weights, whose codes go in without their float images
being written, also the same codes layout. Controls: two swapped weights change the outputs;
a converted input that does not match its weight is refused."""

import numpy as np
import pytest
import torch

from helpers import run_tflite_prefill_decode
from slmc import api
from slmc.errors import SlmcError
from slmc.targets.tflite.target import convert
from slmc.targets.tflite.weights import PREFIX, lifted_weights, splice

P = 8


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return api.load(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def both(model):
    lifted, _ = convert(model, P)
    plain, _ = convert(model, P, lift=False)
    return lifted, plain


def _graph(path):
    """Per subgraph: each op's code with its inputs' and outputs' (shape, type, constant?)."""
    from ai_edge_litert import schema_py_generated as S

    data = path.read_bytes()
    mt = S.ModelT.InitFromPackedBuf(data, 0)

    def desc(sg, i):
        if i < 0:
            return None
        t, b = sg.tensors[i], mt.buffers[sg.tensors[i].buffer]
        const = b.offset > 1 or (b.data is not None and len(b.data) > 0)
        return tuple(t.shape), t.type, const

    return [[(max(mt.operatorCodes[op.opcodeIndex].builtinCode, mt.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode),
              [desc(sg, i) for i in op.inputs], [desc(sg, i) for i in op.outputs]) for op in sg.operators]
            for sg in mt.subgraphs]


def _buffers(path):
    """The sorted digests of every non-empty buffer's bytes."""
    import hashlib

    from ai_edge_litert import schema_py_generated as S

    data = path.read_bytes()
    mt = S.ModelT.InitFromPackedBuf(data, 0)
    raw = [data[b.offset:b.offset + b.size] if b.offset > 1 else bytes(b.data if b.data is not None else b"")
           for b in mt.buffers]
    return sorted(hashlib.sha256(r).hexdigest() for r in raw if r)


def test_same_graph_and_signatures(both):
    lifted, plain = both
    assert _graph(lifted) == _graph(plain)
    from ai_edge_litert.interpreter import Interpreter

    a, b = Interpreter(model_path=str(lifted)), Interpreter(model_path=str(plain))
    assert a.get_signature_list() == b.get_signature_list()
    assert not any(PREFIX in n for s in a.get_signature_list().values() for n in s["inputs"])


def test_same_outputs_bit_for_bit(both):
    assert _buffers(both[0]) == _buffers(both[1])
    (pa, da), (pb, db) = run_tflite_prefill_decode(both[0], P), run_tflite_prefill_decode(both[1], P)
    for k in pb:
        np.testing.assert_array_equal(pa[k], pb[k])
    np.testing.assert_array_equal(da["logits"], db["logits"])


QUANT = {  # weight-only codes (DEQUANTIZE chains, a hybrid lookup) and int8-activation filters
    "int4-g32": ["quant.rtn:bits=4,group_size=32,symmetric=false,head_bits=4,embed_bits=8"],
    "8da4w": ["quant.rtn:bits=4,group_size=32,act_bits=8,scale_dtype=bfloat16,head_bits=4,embed_bits=4"],
}


@pytest.mark.parametrize("name", sorted(QUANT))
def test_quantized_same_graph_outputs_and_layout(tiny_llama_dir, name):
    m, _ = api.run_passes(api.load(str(tiny_llama_dir)), QUANT[name])
    (lifted, la), (plain, lb) = convert(m, P), convert(m, P, lift=False)
    assert la == lb and la  # every QuantWeight, stored the same way
    assert _graph(lifted) == _graph(plain)
    (pa, da), (pb, db) = run_tflite_prefill_decode(lifted, P), run_tflite_prefill_decode(plain, P)
    np.testing.assert_array_equal(da["logits"], db["logits"])
    assert _buffers(lifted) == _buffers(plain)  # the same bytes stored (tensor names differ)


def test_weights_stored_once_and_tied_table_once(model, both):
    from ai_edge_litert import schema_py_generated as S

    lifted, _ = both
    mt = S.ModelT.InitFromPackedBuf(lifted.read_bytes(), 0)
    sizes = sorted(b.size for b in mt.buffers if b.offset > 1)
    from slmc.compiler.lowering import LoweredLM, LoweringSpec
    from slmc.targets.tflite.target import COMPONENTS

    lm = LoweredLM(model, LoweringSpec(kv="io", positions="start", mask_input=False, dequantize=True,
                                       components=COMPONENTS))
    ws = lifted_weights(lm)
    assert model.lm_head is None  # the tiny model ties its head: one table, one buffer
    for _, w in ws:
        sizes.remove(w.nbytes)  # each lifted weight has its own buffer, once
    assert sum(sizes) < sum(w.nbytes for _, w in ws) / 10  # what is left is small constants


def test_swapped_weights_change_outputs(model, both):
    """Control: the bit-for-bit comparison sees two same-shape weights swapped."""
    from slmc.compiler.lowering import LoweredLM, LoweringSpec
    from slmc.targets.tflite import target as T

    lm = LoweredLM(model, LoweringSpec(kv="io", positions="start", mask_input=False, dequantize=True,
                                       components=T.COMPONENTS))
    ws = lifted_weights(lm)
    i, j = next((i, j) for i in range(len(ws)) for j in range(i + 1, len(ws)) if ws[i][1].shape == ws[j][1].shape)
    orig = T.splice
    try:
        def swapped(path, weights, quant):
            w = list(weights)
            w[i], w[j] = (w[i][0], w[j][1]), (w[j][0], w[i][1])
            return orig(path, w, quant)
        T.splice = swapped
        bad, _ = convert(model, P)
    finally:
        T.splice = orig
    (_, bad_decode), (_, decode) = run_tflite_prefill_decode(bad, P), run_tflite_prefill_decode(both[0], P)
    assert not np.array_equal(bad_decode["logits"], decode["logits"])


def test_a_mismatched_weight_is_refused(model, tmp_path):
    import shutil

    from slmc.targets.tflite import target as T

    orig, seen, kept = T.splice, {}, tmp_path / "kept.tflite"

    def keep(path, weights, quant):  # the converter's output, before the splice
        shutil.copy(path, kept)
        seen["w"] = weights
        return orig(path, weights, quant)
    T.splice = keep
    try:
        convert(model, P)
    finally:
        T.splice = orig
    w = list(seen["w"])
    w[0] = (w[0][0], torch.zeros(w[0][1].shape[0] + 1, *w[0][1].shape[1:]))
    with pytest.raises(SlmcError, match=r"w0 \(FLOAT32 \[257, 64\]\) a FLOAT32 \[256, 64\] input; slmc cannot put it back"):
        splice(kept, w)
    with pytest.raises(SlmcError, match="only 1 weights"):
        splice(kept, seen["w"][:1])
