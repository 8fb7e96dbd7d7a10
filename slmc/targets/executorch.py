"""ExecuTorch target: a `.pte` that ExecuTorch's stock LLM runner runs unmodified.

Conventions of `executorch.extension.llm.runner.TextLLMRunner` (and the C++ runner
behind it), which this target follows:
- method `forward(tokens[1, T] int64, input_pos[1] int64) -> logits`; a second input
  of one element means "start position", and the cache lives inside the program
  as mutable buffers;
- constant metadata methods: get_max_seq_len, get_max_context_len, get_vocab_size,
  get_bos_id, get_eos_ids, get_n_layers, use_kv_cache, enable_dynamic_shape,
  use_sdpa_with_kv_cache.
Only ops the pip runtime has kernels for are emitted (no llama::custom_sdpa /
llama::update_cache), so the host can validate every artifact.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compiler.ir import Model, QuantWeight, named_weights
from ..compiler.lowering import LoweringSpec, export_decoder, io_spec, max_chunk
from .base import Artifact, Target, TargetSpec, kv_refusal, register, ring_manifest
from .executorch_backends import BACKENDS

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


class ExecuTorchTarget(Target):
    name = "executorch"
    backends = tuple(BACKENDS)
    host_backends = tuple(n for n, b in BACKENDS.items() if b.host_runnable)
    spec_class = ExecuTorchSpec
    # One GEMM for q/k/v and one for gate/up: fewer, larger delegate calls per token.
    default_passes = ("canon.fuse_projections",)

    def quant_rules(self, spec):
        return BACKENDS[spec.backend_name].quant if spec.backend_name in BACKENDS else None

    def supports(self, model: Model, spec: ExecuTorchSpec) -> str | None:
        from .executorch_moe import has_offload_plan, offload_supports

        if has_offload_plan(model):  # moe.offload: a backbone program + one program per expert
            why = offload_supports(model)
            if why:
                return why
        # int8 caches: codes + per-token scales as two mutable buffers, run by portable kernels
        # (the expert-offload segments keep float caches only)
        dtypes = ("float32", "float16") if has_offload_plan(model) else ("float32", "float16", "int8")
        ring = "expert-offload segments keep linear caches" if has_offload_plan(model) else None
        why = kv_refusal(model, "ExecuTorch mutable buffers", dtypes, ring, arena=(
            "torch.export turns writes into views of one buffer into whole-buffer copies "
            "(select_scatter), two per layer per call; ExecuTorch's memory planner already places "
            "the per-layer cache buffers in one planned arena"))
        if why:
            return why
        if any(isinstance(w, QuantWeight) for _, w in named_weights(model)):
            why = BACKENDS[spec.backend].quant.check(model)
            if why:
                return why
        return BACKENDS[spec.backend].missing()

    def lower(self, model: Model, spec: ExecuTorchSpec, progress=None) -> Artifact:
        from .executorch_moe import has_offload_plan, lower_offload

        step = progress or (lambda msg: None)
        if has_offload_plan(model):
            return lower_offload(model, spec, step)
        backend = BACKENDS[spec.backend]
        lspec = LoweringSpec(full_logits=spec.full_logits)
        step("torch.export")
        ep = export_decoder(model, lspec, dynamic=backend.dynamic)
        meta = runner_metadata(model, backend.dynamic)
        data, delegation = to_pte(ep, spec, meta, step)
        del ep
        manifest = {
            "format": "pte",
            "artifact": "model.pte",
            "io": {"forward": io_spec(model, lspec, backend.dynamic)},
            "delegation": delegation["forward"],
            "host_runnable": backend.host_runnable,
            "backend_note": backend.note,
            "runner": {"convention": "executorch.extension.llm.runner.TextLLMRunner",
                       "metadata_methods": meta},
            "kv_cache": {"kind": "mutable_buffers", "buffers_per_layer": ["k_cache_{d}", "v_cache_{d}"],
                         **ring_manifest(model)},
        }
        return Artifact(files={"model.pte": data}, manifest=manifest)


register(ExecuTorchTarget())
