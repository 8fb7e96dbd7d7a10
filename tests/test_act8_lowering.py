"""Every linear the IR marks for int8 dynamic activations (act_bits=8) is lowered with the
per-token activation quantizer in front of it, whichever algorithm chose its codes.

The int8da-int4w-g32 recipe (AWQ: scales folded into the norms and the rows before) and
its -rtn twin lower to the same pattern: choose_qparams_affine -> quantize_affine ->
dequantize_affine -> linear, the pattern ExecuTorch's XNNPACK partitioner turns into qd8
GEMMs. A folded AWQ scale must not route a linear around it (a float path over the
dequantized weights would still run, and be ~1e-6 KL from the reference).
"""

from __future__ import annotations

import pytest
import torch

from slmc import api
from slmc.compiler.ir import QuantWeight, block_linears
from slmc.compiler.lowering.export import export_decoder
from slmc.recipes import recipe_passes


def _name(node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def act8_linears(ep) -> int:
    """Linears whose input is a dynamically quantized activation: dequantize_affine of a
    quantize_affine whose scale and zero point come from choose_qparams_affine."""
    n = 0
    for node in ep.graph.nodes:
        if node.op != "call_function" or not _name(node).startswith("linear"):
            continue
        x = node.args[0]
        if not (hasattr(x, "target") and _name(x).startswith("dequantize_affine")):
            continue
        q = x.args[0]
        if hasattr(q, "target") and _name(q).startswith("quantize_affine") and \
                any(hasattr(a, "target") and _name(a) == "getitem" and _name(a.args[0]).startswith("choose_qparams")
                    for a in q.args[1:3]):
            n += 1
    return n


def marked(ir) -> list:
    lins = [lin for _, lin in block_linears(ir)] + ([ir.lm_head] if ir.lm_head is not None else [])
    return [lin for lin in lins if isinstance(lin.weight, QuantWeight) and lin.weight.act_bits == 8]


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir):
    """recipe -> its quantized tiny IR (AWQ and GPTQ with a short data-free calibration)."""
    out = {}
    for recipe in ("int8da-int4w-g32", "int8da-int4w-g32-rtn"):
        passes = recipe_passes(recipe, "executorch", "xnnpack")
        passes = [p + ",n_seqs=2,seq_len=64" if p.startswith(("quant.awq", "quant.gptq")) else p for p in passes]
        ir, log = api.run_passes(api.load(str(tiny_llama_dir), max_seq_len=48), passes)
        out[recipe] = ir, log
    return out


@pytest.mark.parametrize("recipe", ["int8da-int4w-g32", "int8da-int4w-g32-rtn"])
def test_every_act8_linear_is_lowered_with_its_activation_quantizer(quantized, recipe):
    ir, log = quantized[recipe]
    lins = marked(ir)
    assert len(lins) == 2 * 7 + 1  # every block linear of the 2 layers, and the head
    if recipe == "int8da-int4w-g32":
        assert log[0].info["scaled_groups"] > 0  # AWQ scales were folded
    assert act8_linears(export_decoder(ir)) == len(lins)


def test_the_count_sees_a_dropped_activation_quantizer(quantized):
    """Control: one linear's activations back to float, one quantizer fewer in the graph."""
    ir, _ = quantized["int8da-int4w-g32"]
    lin = marked(ir)[3]
    lin.weight.act_bits = 0
    try:
        assert act8_linears(export_decoder(ir)) == len(marked(ir)) == 14
    finally:
        lin.weight.act_bits = 8


def test_reference_executor_applies_the_quantizer(quantized):
    """The reference runs the same per-token quantizer on the same linears: act_bits 0 changes it."""
    ir, _ = quantized["int8da-int4w-g32"]
    ids = torch.arange(20)[None] % ir.vocab_size
    from slmc.compiler import reference

    with_q = reference.forward(ir, ids)
    lins = marked(ir)
    for lin in lins:
        lin.weight.act_bits = 0
    try:
        without = reference.forward(ir, ids)
    finally:
        for lin in lins:
            lin.weight.act_bits = 8
    assert (with_q - without).abs().max() > 1e-4


def fully_connected_inputs(path) -> list[tuple[str, str, bool]]:
    """(input type, filter type, asymmetricQuantizeInputs) of every FULLY_CONNECTED in the decode signature."""
    from ai_edge_litert import schema_py_generated as S

    types = {v: k for k, v in vars(S.TensorType).items() if not k.startswith("_")}
    m = S.ModelT.InitFromObj(S.Model.GetRootAsModel(path.read_bytes(), 0))
    sg = next(g for g in m.subgraphs if g.name == b"decode")
    out = []
    for op in sg.operators:
        code = m.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == S.BuiltinOperator.FULLY_CONNECTED:
            out.append((types[sg.tensors[op.inputs[0]].type], types[sg.tensors[op.inputs[1]].type],
                        bool(op.builtinOptions.asymmetricQuantizeInputs)))
    return out


@pytest.mark.parametrize("recipe", ["int8da-int4w-g32", "int8da-int4w-g32-rtn"])
def test_litert_runs_every_act8_linear_as_a_dynamically_quantized_gemm(tiny_llama_dir, tmp_path, recipe):
    """LiteRT: each act8 linear is a hybrid FULLY_CONNECTED (float input, int4 filter,
    asymmetric per-row input quantization), none a float GEMM over dequantized weights."""
    passes = recipe_passes(recipe, "tflite", "cpu")
    passes = [p + ",n_seqs=2,seq_len=64" if p.startswith(("quant.awq", "quant.gptq")) else p for p in passes]
    out, _ = api.compile_model(str(tiny_llama_dir), "tflite", None, tmp_path / "a", max_seq_len=48, passes=passes)
    fcs = fully_connected_inputs(next(out.glob("*.tflite")))
    assert fcs == [("FLOAT32", "INT4", True)] * 15
