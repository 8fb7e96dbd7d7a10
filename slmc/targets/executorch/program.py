"""ExecuTorch programs: the spec, the runner's metadata methods and `.pte` serialization,
shared by the dense decoder (target.py) and the expert-offload layout (moe.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ...compiler.ir import Model
from ...compiler.lowering import max_chunk
from ..base import TargetSpec
from .backends import BACKENDS

DEFAULT_SOC = {"qnn": "SM8650", "mediatek": "mt6989"}


@dataclass(frozen=True)
class ExecuTorchSpec(TargetSpec):
    backend: str = "xnnpack"
    full_logits: bool = False
    fp16: bool = True  # Core ML delegate compute precision
    soc: str = ""  # NPU backends: the chip (QNN: SM8650 ...; MediaTek: mt6989 ...)

    def __post_init__(self):
        if not self.soc and self.backend in DEFAULT_SOC:
            object.__setattr__(self, "soc", DEFAULT_SOC[self.backend])


def delegation_summary(edge, method: str = "forward") -> dict:
    """How much of the graph the backend took: delegate calls vs ops left to portable kernels."""
    calls, left = 0, {}
    for n in edge.exported_program(method).graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(n.target, "__name__", str(n.target))
        if "executorch_call_delegate" in name:
            calls += 1
        elif not name.startswith(("getitem", "sym_size")) and name not in ("mul", "add", "sub"):
            key = name.split(".")[0]
            left[key] = left.get(key, 0) + 1
    return {"delegate_calls": calls, "portable_ops": dict(sorted(left.items()))}


def runner_metadata(model: Model, dynamic: bool = True) -> dict:
    eos = model.eos_ids or []
    meta = {
        # tokens per forward call: the runner's prefill splits longer prompts into such chunks
        "get_max_seq_len": max_chunk(model) if model.kv.window is not None else model.kv.max_len,
        "get_max_context_len": model.kv.max_len,
        "get_vocab_size": model.vocab_size,
        "get_n_layers": model.n_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": dynamic,
        "get_eos_ids": list(eos),
    }
    if model.bos_id is not None:
        meta["get_bos_id"] = model.bos_id
    return meta


def backend_config(shared_state: bool = False):
    """How every slmc .pte is serialized. shared_state: every method's mutable buffers live
    in one arena, by name (the runtime otherwise lets methods overwrite each other's)."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    return ExecutorchBackendConfig(
        extract_delegate_segments=True,
        # dequantize_affine + embedding -> quantized_decomposed::embedding_4bit/byte
        do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=shared_state),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())


def to_pte(programs, spec: ExecuTorchSpec, constant_methods: dict | None = None, step=lambda msg: None,
           shared_state: bool = False) -> tuple[bytes, dict]:
    """One ExportedProgram (method "forward") or {method: ExportedProgram} -> (.pte bytes,
    delegation summary per method)."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    step(f"to_edge + {spec.backend} partitioning")
    edge = to_edge_transform_and_lower(
        programs, partitioner=BACKENDS[spec.backend].partitioners(spec),
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=constant_methods)
    delegation = {m: delegation_summary(edge, m) for m in (programs if isinstance(programs, dict) else ["forward"])}
    step("to_executorch")
    return edge.to_executorch(backend_config(shared_state)).buffer, delegation
