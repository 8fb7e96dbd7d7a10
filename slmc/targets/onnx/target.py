"""ONNX Runtime target: `model.onnx` (+ `model.onnx.data` for large weights) and a
`genai_config.json`, a folder that onnxruntime-genai's generator loads as it is and that
onnxruntime's InferenceSession runs (export.py: names, layouts and positions).

Float weights (fp32), or slmc's own int4/int8 codes as MatMulNBits (linears, head) and
GatherBlockQuantized (embedding) with float activations (rules.py, codes.py). Backends are onnxruntime execution providers (genai_config.py),
recorded as provider options for the device's onnxruntime; `cpu` runs on this host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ...compiler.ir import Model, QuantWeight, named_weights
from ...errors import SlmcError
from ..base import Artifact, Target, TargetSpec, kv_refusal
from ..bounds import FLOAT_EXACT
from .export import DATA_FILE, OPSET, PAST, PRESENT, SEQ, export_onnx
from .genai_config import PROVIDERS, genai_config, genai_type
from .readback import readback
from .rules import ONNX_RT, layout_refusal
from .session import open_onnx


@dataclass(frozen=True)
class ONNXSpec(TargetSpec):
    backend: str = "cpu"
    # qnn: also compile QNN context binaries (an EP-context model) ahead of time
    context_binary: bool = False

    def __post_init__(self):  # `--backend qnn:context_binary`
        name, _, opts = self.backend.partition(":")
        for item in filter(None, opts.split(",")):
            if item != "context_binary" or name != "qnn":
                raise SlmcError(f"unknown ONNX backend option {item!r}; options: qnn:context_binary",
                                "--backend")
            object.__setattr__(self, "context_binary", True)

    @property
    def backend_name(self) -> str:
        return self.backend.partition(":")[0]


def _qnn_context_refusal() -> str:
    import onnxruntime as ort

    have = ort.get_available_providers()
    if PROVIDERS["qnn"].ort_name not in have:
        return ("QNN context binaries are compiled by onnxruntime's QNN execution provider with the "
                "Qualcomm QNN SDK (onnxruntime-qnn, QNN_SDK_ROOT); this onnxruntime has only "
                f"{', '.join(have)}. Use --backend qnn to record the QNN provider for the device")
    return ("QNN context-binary generation is not implemented in slmc yet; use --backend qnn "
            "(the device's onnxruntime-qnn compiles the graph at session creation)")


class ONNXTarget(Target):
    name = "onnx"
    backends = tuple(PROVIDERS)
    # the PyPI onnxruntime has the CPU EP only (no XNNPACK): get_available_providers()
    host_backends = ("cpu",)
    spec_class = ONNXSpec
    formats = ("onnx",)
    # every backend's graph is validated in onnxruntime's CPU EP here: fp32 kernels, which
    # differ from the reference only by summation order. Quantized: MatMulNBits (accuracy_level=1)
    # and GatherBlockQuantized dequantize to exactly the reference's fp32 weights, (c - z) * s
    # with one rounding (an integer times an fp32 scale), then run the same fp32 GEMM: again
    # only summation order differs, so the float bound holds (int8 activations are refused).
    # An 8-bit weight is read as two 4-bit planes (split8.py: ONNX Runtime has no fast fp32
    # kernel for 8-bit B): two products and a sum, within 2^-14 * s of the reference's weight,
    # an error of the size of a changed summation order (tests/test_onnx_split8.py).
    tolerances = {(b, kind): FLOAT_EXACT for b in PROVIDERS for kind in ("float", "quant")}

    def quant_rules(self, spec):
        return ONNX_RT

    def supports(self, model: Model, spec: ONNXSpec) -> str | None:
        if any(isinstance(w, QuantWeight) for _, w in named_weights(model)):
            why = ONNX_RT.check(model) or layout_refusal(model)
            if why:
                return why
        why = kv_refusal(model, "onnxruntime-genai past/present I/O",
                         ring="genai's past/present buffers keep one row per position; use a max length",
                         arena="genai binds one past_key_values.{i}.key/value buffer per layer by name")
        if why:
            return why
        if model.kv.layout != "bhsd":
            return ("a bshd KV cache is not lowered for onnxruntime-genai past/present I/O: genai binds "
                    "caches as [batch, kv_heads, seq, head_dim] (use kv.cache:layout=bhsd)")
        if spec.context_binary:
            return _qnn_context_refusal()
        return None

    def lower(self, model: Model, spec: ONNXSpec, progress=None) -> Artifact:
        step = progress or (lambda msg: None)
        step("torch.onnx.export (dynamo)")
        files, io = export_onnx(model)
        config = genai_config(model, spec.backend_name)
        files["genai_config.json"] = (json.dumps(config, indent=4, sort_keys=True) + "\n").encode()
        prov = PROVIDERS[spec.backend_name]
        manifest = {
            "format": "onnx",
            "artifact": "model.onnx",
            "external_data": DATA_FILE if DATA_FILE in files else None,
            "opset": OPSET,
            "exporter": "torch.onnx.export(dynamo=True) of the shared lowering (torch.export + onnxscript)",
            "io": io,
            "positions": ("position_ids[0, i] is token i's position; its K/V rows are written at that row of "
                          "the cache and it attends to rows <= it (and within its layer's sliding window). "
                          "No attention_mask input: batch 1."),
            "kv_cache": {"kind": "past_present_io", "names": [PAST % "key", PAST % "value",
                                                              PRESENT % "key", PRESENT % "value"],
                         "layout": model.kv.layout, "dtype": model.kv.dtype, "max_len": model.kv.max_len,
                         "axes": "[1, kv_heads, max_len, head_dim]",
                         "past_present_share_buffer": True,
                         "fixed_size": "past and present are max_len rows long (slmc's fixed-size cache), "
                                       "not growing: a runtime passes each call's present as the next past, "
                                       "or binds both to one buffer (genai: past_present_share_buffer)"},
            "execution_provider": {"backend": spec.backend_name, "ort_name": prov.ort_name,
                                   "genai_provider_options": {prov.genai_name: prov.options} if prov.genai_name else {},
                                   "note": prov.note, "host_runnable": prov.ort_name == "CPUExecutionProvider"},
            "runner": {"convention": "onnxruntime-genai decoder (og.Model on this folder)",
                       "config": "genai_config.json", "model_type": genai_type(model),
                       "logits": f"[1, {SEQ}, vocab] (all positions)"},
        }
        return Artifact(files=files, manifest=manifest)

    def open_session(self, folder, manifest):
        return open_onnx(folder, manifest)

    def readback(self, model, artifact):
        # `artifact`: model.onnx (its external data is read from beside it); float: checked=0
        return readback(model, artifact)

    def hidden_states(self, model, manifest, ids):
        from .intermediates import hidden_states

        return hidden_states(model, manifest, ids)
