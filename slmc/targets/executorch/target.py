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

from ...compiler.ir import Model, QuantWeight, named_weights
from ...compiler.lowering import LoweringSpec, export_decoder, io_spec
from ...compiler.lowering.attention import RowCacheAttention
from ...compiler.lowering.components import Components
from ...compiler.lowering.layers import LEmbedding, PairSwappedEmbedding
from ..base import Artifact, Target, cache_axes, kv_refusal, ring_manifest
from ..bounds import ACT8_STATISTICAL, FLOAT_EXACT
from .backends import BACKENDS
from .moe import FORMAT, has_offload_plan, lower_offload, offload_supports
from .moe_runner import open_moe
from .program import PTD, ExecuTorchSpec, runner_metadata, shared_quant_table, tied_table, to_pte_and_data
from .readback import readback
from .session import ExecuTorchSession

# XNNPACK: V caches by column, [1, kv_heads, head_dim, max_len], which its bmm reads with the
# keys' transposed-operand flag (bmm_operands.py) instead of packing [L, hd] with a scalar loop
XNNPACK_ATTENTION = RowCacheAttention(values_by_column=True)


class ExecuTorchTarget(Target):
    name = "executorch"
    backends = tuple(BACKENDS)
    host_backends = tuple(n for n, b in BACKENDS.items() if b.host_runnable)
    spec_class = ExecuTorchSpec
    # q/k/v and gate/up as separate GEMMs: XNNPACK takes no split (nor slice) of a tensor with
    # a dynamic length, so a fused projection's split ran in the portable kernels and cut each
    # layer into more delegate calls (SmolLM2-135M fp32, with views.py: 153 calls fused, 33 split).
    default_passes = ("canon.split_projections",)
    formats = ("pte", "pte-moe")  # pte-moe: expert offload (moe.py), the same kernels
    tolerances = {
        ("xnnpack", "float"): FLOAT_EXACT,
        ("portable", "float"): FLOAT_EXACT,
        # int8 dynamic activations (8da4w): XNNPACK's qd8 GEMMs may round an activation on a
        # .5 boundary the other way than torch: judged statistically (bounds.py)
        ("xnnpack", "quant-act8"): ACT8_STATISTICAL,
        # quantized tables only (no int8 activations): dequantized exactly, fp32 compute
        ("xnnpack", "quant"): FLOAT_EXACT,
    }

    def quant_rules(self, spec):
        return BACKENDS[spec.backend_name].quant if spec.backend_name in BACKENDS else None

    def open_session(self, folder, manifest):
        if manifest.get("format") == FORMAT:
            return open_moe(folder, manifest)
        return ExecuTorchSession.from_artifact(folder, manifest)

    def readback(self, model, artifact):
        return readback(model, artifact)

    def hidden_states(self, model, manifest, ids):
        from .intermediates import hidden_states

        return hidden_states(model, manifest, ids)

    def supports(self, model: Model, spec: ExecuTorchSpec) -> str | None:
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
        step = progress or (lambda msg: None)
        if has_offload_plan(model):
            return lower_offload(model, spec, step)
        backend = BACKENDS[spec.backend]
        # a shared int4 table: the embedding reads it in the byte order of XNNPACK's head
        embedding = PairSwappedEmbedding if shared_quant_table(model, spec.backend) == 4 else LEmbedding
        attention = XNNPACK_ATTENTION if spec.backend == "xnnpack" else RowCacheAttention()
        lspec = LoweringSpec(full_logits=spec.full_logits,
                             components=Components(embedding=embedding, attention=attention))
        step("torch.export")
        ep = export_decoder(model, lspec, dynamic=backend.dynamic)
        meta = runner_metadata(model, backend.dynamic)
        tied = tied_table(model, spec.backend)
        data, delegation, ptd = to_pte_and_data(ep, spec, meta, step, tied=tied)
        del ep
        files = {"model.pte": data, **({PTD: ptd} if ptd is not None else {})}
        manifest = {
            "format": "pte",
            "artifact": "model.pte",
            # the tied embedding/head table, stored once: load_program(pte, data_path=...),
            # TextLLMRunner(pte, tokenizer, data_path)
            **({"data_file": PTD} if ptd is not None else {}),
            "io": {"forward": io_spec(model, lspec, backend.dynamic)},
            "delegation": delegation["forward"],
            "host_runnable": backend.host_runnable,
            "backend_note": backend.note,
            "runner": {"convention": "executorch.extension.llm.runner.TextLLMRunner",
                       "metadata_methods": meta},
            "kv_cache": {"kind": "mutable_buffers", "buffers_per_layer": ["k_cache_{d}", "v_cache_{d}"],
                         **cache_axes(model, attention.columns(model.kv)),
                         **ring_manifest(model)},
        }
        return Artifact(files=files, manifest=manifest)

