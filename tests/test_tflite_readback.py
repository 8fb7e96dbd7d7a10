"""LiteRT readback reads each quantized weight in the tensor the graph uses for it
(slmc/targets/tflite/readback.py): the head in the logits' matmul, the embedding in the tokens'
lookup, every tensor of codes accounted for by a weight. A tied table reads back alike stored
once (two tensors, one buffer: what codes.py writes) or twice (two buffers)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slmc import api
from slmc.compiler.ir import QuantWeight, named_weights
from slmc.targets.tflite.codes import _buffers_raw, _pack
from slmc.targets.tflite.readback import _load, readback

# the int8da-int4w-g32 recipe's pass: int4 head and embedding from the tied table
ACT8 = "quant.rtn:bits=4,group_size=32,scale_dtype=bfloat16,act_bits=8,symmetric=true,head_bits=4,embed_bits=4"


@pytest.fixture(scope="module")
def built(tiny_llama_dir, tmp_path_factory):
    ir, _ = api.run_passes(api.load(tiny_llama_dir, max_seq_len=32), (ACT8,))
    folder, _ = api.compile_ir(ir, "tflite", "cpu", tmp_path_factory.mktemp("rb") / "a", tokenizer=tiny_llama_dir)
    return ir, folder / "model.tflite"


def head_and_table(path):
    """(decode's logits matmul weight tensor, decode's tokens lookup table tensor), as indices."""
    S, _, sigs = _load(path)
    g, _, outs = next(s for s in sigs if "logits" in s[2])
    op = g.sg.operators[g.producer[outs["logits"]]]
    table = next(int(o.inputs[1]) for oi, o in enumerate(g.sg.operators)
                 if g.codes[oi] == S.BuiltinOperator.EMBEDDING_LOOKUP and int(o.inputs[1]) in g.uses)
    return g, int(op.inputs[1]), table


def head_codes(path):
    """The .tflite's object model, its raw buffers, the head's subgraph and tensor index, and a
    copy of the head's codes (what both rewrites below start from)."""
    from ai_edge_litert import schema_py_generated as S

    data = path.read_bytes()
    mt = S.ModelT.InitFromPackedBuf(bytearray(data), 0)
    raw = _buffers_raw(mt, data)
    g, head, _ = head_and_table(path)
    sg = mt.subgraphs[[s.name for s in mt.subgraphs].index(g.sg.name)]
    return mt, raw, sg, head, np.array(raw[sg.tensors[head].buffer], np.uint8)


def own_head_buffer(src, dst, flip: bool = False) -> None:
    """Rewrite the .tflite with the head's codes in a buffer of their own (two codes flipped
    with `flip`), the embedding's table unchanged: the layout of a tied table stored twice."""
    from ai_edge_litert import schema_py_generated as S

    mt, raw, sg, head, codes = head_codes(src)
    if flip:
        codes[:2] ^= 0x0F  # c -> -1 - c in two int4 codes (low nibbles)
    mt.buffers.append(S.BufferT())
    raw.append(codes)
    sg.tensors[head].buffer = len(mt.buffers) - 1
    dst.write_bytes(_pack(mt, raw))


def test_tied_table_in_one_buffer_reads_back_exact(built):
    ir, path = built
    g, head, table = head_and_table(path)
    assert g.sg.tensors[head].buffer == g.sg.tensors[table].buffer  # codes.py: one buffer, two tensors
    rb = readback(ir, path)
    assert rb.exact and rb.checked == sum(isinstance(w, QuantWeight) for _, w in named_weights(ir)), rb.missing


def test_tied_table_in_two_buffers_reads_back_exact_and_a_flipped_head_fails(built, tmp_path):
    ir, path = built
    two = tmp_path / "two.tflite"
    own_head_buffer(path, two)
    g, head, table = head_and_table(two)
    assert g.sg.tensors[head].buffer != g.sg.tensors[table].buffer
    assert readback(ir, two).exact
    # the honest head codes stay in the file (the embedding's buffer): the head's own tensor is read
    flipped = tmp_path / "flipped.tflite"
    own_head_buffer(path, flipped, flip=True)
    missing = readback(ir, flipped).missing
    assert missing[0].startswith(f"lm_head.weight: decode's logits matmul reads decode tensor {head} "), missing
    assert "codes are not the reference's" in missing[0] and len(missing) == 1, missing  # one line names it


def _first_block_weight(ir):
    return next((p, w) for p, w in named_weights(ir) if p.startswith("blocks.") and isinstance(w, QuantWeight))


@pytest.mark.parametrize("change", ["head codes", "embed codes", "block scales", "block act_bits"])
def test_a_reference_other_than_the_artifact_is_named(built, change):
    """The artifact is honest; the reference differs in one weight: the readback names it and
    the tensor it reads for it, in one line."""
    ir, path = built
    ref = copy.deepcopy(ir)
    if change in ("head codes", "embed codes"):
        w = ref.lm_head.weight if change == "head codes" else ref.embed
        codes = w.codes.clone()
        codes.view(-1)[:2] = -1 - codes.view(-1)[:2]
        w.codes = codes
        name = "lm_head.weight: decode's logits matmul reads" if change == "head codes" else \
            "embed: prefill's lookup of the tokens reads"
    else:
        name, w = _first_block_weight(ref)
        if change == "block scales":
            w.scales = (w.scales * 1.5).to(torch.bfloat16).to(w.scales.dtype)
        else:
            w.act_bits = 0
    missing = readback(ref, path).missing
    assert len(missing) == 1 and missing[0].startswith(name) and " tensor " in missing[0], missing
    if change == "block scales":
        assert "whose scales are not the reference's" in missing[0], missing
    if change == "block act_bits":
        assert "FULLY_CONNECTED filter (int8 dynamic activations)" in missing[0], missing


def test_a_tensor_of_codes_no_weight_accounts_for_is_named(built, tmp_path):
    """A tensor of codes that holds no weight's codes and scales fails, named: here a stray copy
    of the head's tensor with two codes flipped, read by no op (the head still reads the honest
    shared buffer, so every weight is found where the graph reads it)."""
    from ai_edge_litert import schema_py_generated as S

    ir, path = built
    mt, raw, sg, head, codes = head_codes(path)
    codes[:2] ^= 0x0F
    mt.buffers.append(S.BufferT())
    raw.append(codes)
    extra = copy.deepcopy(sg.tensors[head])
    extra.name, extra.buffer = b"stray", len(mt.buffers) - 1
    sg.tensors.append(extra)
    out = tmp_path / "stray.tflite"
    out.write_bytes(_pack(mt, raw))
    missing = readback(ir, out).missing
    assert missing == [(f"decode tensor {len(sg.tensors) - 1} 'stray': int4 codes that are no quantized weight of "
                        "the reference (codes or scales differ)")], missing
