"""Which ops of a `.tflite` would fall back from the LiteRT GPU delegate (to the CPU).

Static check: each op of each signature's subgraph, read from the flatbuffer, against the op
cases and rank/dtype rules of TFLite's GPU delegate compatibility checker. ai_edge_litert's
own Analyzer(gpu_compatibility=True) cannot be used: in the 2.3.0 wheel it answers
"compatible" even for ops that checker rejects (GATHER_ND, STABLEHLO_SCATTER), and this host
has no GPU to try the delegate on.
"""

from __future__ import annotations

import mmap
from pathlib import Path

# Op cases accepted by TFLite's GPU delegate compatibility checker
# (tensorflow/lite/tools/versioning/gpu_compatibility.cc, CheckGpuDelegateCompatibility).
_GPU_OPS = set("""ADD ADD_N AVERAGE_POOL_2D BATCH_MATMUL CAST CONCATENATION CONV_2D CUMSUM DENSIFY
DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE EMBEDDING_LOOKUP DYNAMIC_UPDATE_SLICE FULLY_CONNECTED
GATHER HARD_SWISH LSTM MAX_POOL_2D MEAN MUL PACK ONE_HOT QUANTIZE RELU_N1_TO_1 PRELU RESHAPE SELECT
SELECT_V2 SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SPLIT_V STRIDED_SLICE TILE TRANSPOSE TRANSPOSE_CONV
RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR RELU RELU6 LEAKY_RELU REDUCE_MAX REDUCE_MIN REDUCE_PROD SUM PAD
PADV2 MIRROR_PAD ABS CEIL COS ELU EXP FLOOR GELU LOG LOGISTIC NEG RSQRT SIGN SIN SQRT SQUARE TANH
ATAN2 DIV EQUAL FLOOR_DIV FLOOR_MOD GREATER GREATER_EQUAL LOGICAL_AND LESS LESS_EQUAL MAXIMUM MINIMUM
NOT_EQUAL POW SQUARED_DIFFERENCE SUB STABLEHLO_CLAMP""".split())
GPU_METHOD = ("static: every op of each signature's subgraph, read from the flatbuffer, checked against "
              "the op cases and rank/dtype rules of TFLite's GPU delegate compatibility checker "
              "(tensorflow/lite/tools/versioning/gpu_compatibility.cc). Not used: ai_edge_litert 2.3.0's "
              "Analyzer(gpu_compatibility=True), whose build here answers 'compatible' for every model "
              "(it passes ops the checker rejects, e.g. GATHER_ND), and a live GPU delegate (no GPU here).")


def _gpu_reason(name: str, ins: list, outs: list) -> str | None:
    """None if the GPU delegate takes the op, else why not. ins/outs: (type, rank, is_const)."""
    if name not in _GPU_OPS:
        return "op not supported by the GPU delegate"
    if name in ("SLICE", "STRIDED_SLICE") and ins[0][1] not in (3, 4):
        return f"{name} on a rank-{ins[0][1]} tensor (GPU: rank 3 or 4 only)"
    if name == "GATHER" and (ins[0][0] == "INT32" or ins[1][1] != 1 or ins[1][0] != "INT32"):
        return "GATHER needs a non-int32 input and 1-D int32 indices"
    if name == "EMBEDDING_LOOKUP" and (ins[0][1] != 1 or ins[1][0] not in ("FLOAT32", "INT8", "INT4")):
        return "EMBEDDING_LOOKUP needs 1-D ids and float32/int8/int4 values"
    if name == "FULLY_CONNECTED" and ins[0][2]:
        return "FULLY_CONNECTED with a constant input"
    if name == "ADD_N" and len(ins) != 2:
        return "ADD_N with more than 2 inputs"
    if name == "CAST":
        a, b = ins[0][0], outs[0][0]
        floats = ("FLOAT32", "FLOAT16")
        if not ((a == "BOOL" and b in floats) or (a in floats and b == "BOOL")
                or (a in ("FLOAT32", "INT32") and b in ("FLOAT32", "INT32"))):
            return f"CAST {a} -> {b}"
    return None


def gpu_fallback(data: bytes | Path) -> dict:
    from ai_edge_litert import schema_py_generated as fb

    if isinstance(data, Path):  # the flatbuffer's file, mapped: its tables are read in place
        with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return gpu_fallback(mm)
    m = fb.Model.GetRootAs(data, 0)
    ops = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(fb.TensorType).items() if not k.startswith("_")}

    def tensor(sg, i):
        t = sg.Tensors(i)
        buf = m.Buffers(t.Buffer())
        return types.get(t.Type(), "?"), t.ShapeLength(), buf.DataLength() > 0 or buf.Offset() > 1

    report = {"method": GPU_METHOD, "signatures": {}}
    for s in range(m.SignatureDefsLength()):
        sd = m.SignatureDefs(s)
        sg = m.Subgraphs(sd.SubgraphIndex())
        fallback: dict[str, dict] = {}
        for j in range(sg.OperatorsLength()):
            op = sg.Operators(j)
            oc = m.OperatorCodes(op.OpcodeIndex())
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            name = oc.CustomCode().decode() if code == fb.BuiltinOperator.CUSTOM else ops.get(code, str(code))
            ins = [tensor(sg, op.Inputs(k)) for k in range(op.InputsLength()) if op.Inputs(k) >= 0]
            outs = [tensor(sg, op.Outputs(k)) for k in range(op.OutputsLength())]
            why = _gpu_reason(name, ins, outs)
            if why:
                entry = fallback.setdefault(name, {"count": 0, "reasons": []})
                entry["count"] += 1
                if why not in entry["reasons"]:
                    entry["reasons"].append(why)
        report["signatures"][sd.SignatureKey().decode()] = {
            "ops": sg.OperatorsLength(), "fallback_ops": sum(e["count"] for e in fallback.values()),
            "fallback": fallback}
    return report
