"""ExecuTorch programs: the spec, the runner's metadata methods and `.pte` serialization,
shared by the dense decoder (target.py) and the expert-offload layout (moe.py)."""

from __future__ import annotations

import contextlib
import gc
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ...compiler.ir import Model
from ...compiler.lowering import max_chunk
from ..base import TargetSpec
from .backends import BACKENDS
from .bmm_operands import transposed_operands
from .inplace_writes import InPlaceCacheWrites
from .lean import blob_sha256, lean_lowering
from .views import infer_view_dims

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
            key = name.rsplit(".", 1)[0] if "." in name else name  # aten.view_copy, not its overload
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


def backend_config(shared_state: bool = False, external=None):
    """How every slmc .pte is serialized. shared_state: every method's mutable buffers live
    in one arena, by name (the runtime otherwise lets methods overwrite each other's).
    external: node -> .ptd tag or None, for the constants kept beside the .pte (tied_table)."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    return ExecutorchBackendConfig(
        extract_delegate_segments=True,
        # dequantize_affine + embedding -> quantized_decomposed::embedding_4bit/byte
        do_quant_fusion_and_const_prop=True,
        # KV rows written into the cache buffers in place, not by two whole-cache copies
        run_reinplace_pass=True,
        passes=[InPlaceCacheWrites()],
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=shared_state),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        external_constants=external or False)


PTD = "model.ptd"


def shared_quant_table(model: Model, backend: str) -> int | None:
    """The bit width (4 or 8) of a table that embedding and XNNPACK head both read as the same
    codes (quant.gptq's share_tied, or a tied table quantized once), the head an 8da4w/8da8w
    linear (what XNNPACK delegates); else None. Such a table is stored once (tied_table): int8
    codes are the same bytes in embedding_byte and XNNPACK; int4 ones are looked up with their
    column pairs swapped (PairSwappedEmbedding), so embedding_4bit's bytes equal XNNPACK's."""
    from ...compiler.ir import QuantWeight
    from ...compiler.lowering.layers import pairs_swappable

    e = model.embed
    h = model.lm_head.weight if model.lm_head is not None else e
    if backend != "xnnpack" or not isinstance(e, QuantWeight) or not isinstance(h, QuantWeight):
        return None
    if e.bits not in (4, 8) or e.bits == 4 and not pairs_swappable(e):
        return None
    same = h.bits == e.bits and h.shape == e.shape and h.symmetric and e.symmetric
    return e.bits if same and h.act_bits == 8 and (h is e or bool(torch.equal(h.codes, e.codes))) else None


def tied_table(model: Model, backend: str) -> tuple[int, ...] | None:
    """The shape of the constant that both the embedding (a portable op: a program constant)
    and the delegated head (XNNPACK: the delegate's named data) hold, or None: a float table
    [V, C], or a shared quantized table's codes (shared_quant_table), [V, C] int8 or [V, C/2]
    packed int4. A .pte keeps those two stores apart, so such a table would be stored twice;
    it goes to model.ptd instead, where both keys name one buffer (ExecuTorch's NamedDataStore
    keeps one copy of equal bytes)."""
    from ...compiler.ir import Weight

    bits = shared_quant_table(model, backend)
    if bits is not None:
        v, c = model.embed.shape
        return (v, c * bits // 8)
    if backend != "xnnpack" or model.lm_head is not None or not isinstance(model.embed, Weight):
        return None
    return tuple(model.embed.shape)


@contextlib.contextmanager
def _serializer_hook(spill, tied: bool):
    """While to_executorch serializes (inside ExecutorchProgramManager's constructor, so this
    wraps the serializer it calls there): the emitter's constants kept outside the .pte are
    spilled to files (lean.py) before the .ptd is assembled; with a tied table (tied=True), a
    delegate blob whose bytes equal such a constant goes into that .ptd as well (under its own
    key), so the file holds the bytes once."""
    import executorch.exir.program._program as prog_mod
    from executorch.exir._serialize._named_data_store import NamedDataStoreOutput

    orig = prog_mod.serialize_for_executorch

    def serialize(emitter_output, config, data_serializer, named_data=None):
        # constants kept in the .pte are bytes to its serializer (lean.py's bytes_of made
        # some file mappings); the ones outside it are spilled
        for buf in emitter_output.program.constant_buffer + (emitter_output.mutable_data or []):
            if isinstance(buf.storage, memoryview):
                buf.storage = bytes(buf.storage)
        bufs = emitter_output.external_constant_buffer
        for i, b in enumerate(bufs):
            bufs[i] = spill(b)
        if tied and named_data is not None and emitter_output.external_constant_map:
            tags = {}  # (length, sha256) of each constant kept outside -> its .ptd tag
            for tag, fqns in emitter_output.external_constant_map.items():
                for i in fqns.values():
                    tags[(len(bufs[i]), blob_sha256(bufs[i]))] = tag
            lengths = {n for n, _ in tags}
            keep, external = {}, {t: dict(d) for t, d in named_data.external_data.items()}
            for key, entry in named_data.pte_data.items():
                buf = named_data.buffers[entry.buffer_index]
                tag = tags.get((len(buf), blob_sha256(buf))) if len(buf) in lengths else None
                (external.setdefault(tag, {}) if tag else keep)[key] = entry
            named_data = NamedDataStoreOutput(named_data.buffers, keep, external)
        return orig(emitter_output, config, data_serializer, named_data)

    prog_mod.serialize_for_executorch = serialize
    try:
        yield
    finally:
        prog_mod.serialize_for_executorch = orig


def to_pte(programs, spec: ExecuTorchSpec, constant_methods: dict | None = None, step=lambda msg: None,
           shared_state: bool = False) -> tuple[bytes, dict]:
    """One ExportedProgram (method "forward") or {method: ExportedProgram} -> (.pte bytes,
    delegation summary per method)."""
    pte, delegation, _ = to_pte_and_data(programs, spec, constant_methods, step, shared_state)
    data = pte.read_bytes()
    shutil.rmtree(pte.parent, ignore_errors=True)
    return data, delegation


def to_pte_and_data(programs, spec: ExecuTorchSpec, constant_methods: dict | None = None, step=lambda msg: None,
                    shared_state: bool = False, tied: tuple[int, ...] | None = None
                    ) -> tuple[Path, dict, Path | None]:
    """The .pte and model.ptd (None when there is none) as files in the scratch folder
    (base.scratch_file), and the delegation summary. tied: the shape of a tied float
    table (tied_table), then stored once, in model.ptd."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    def lower(passes):
        return to_edge_transform_and_lower(
            programs, transform_passes=passes, partitioner=BACKENDS[spec.backend].partitioners(spec),
            compile_config=EdgeCompileConfig(_check_ir_validity=False), constant_methods=constant_methods)

    step(f"to_edge + {spec.backend} partitioning")
    with lean_lowering(spec.backend) as spill, transposed_operands():
        try:
            edge = lower([infer_view_dims])
        except AssertionError as e:
            # ExecuTorch's partitioner checks cycles between nodes, not between partitions once
            # fused: with the views delegated it can group two nodes that another partition links
            # (a graph with an int8 KV cache did). Lowered again as exported, views undelegated.
            if "dependency cycles" not in str(e):
                raise
            step(f"{spec.backend} partitioning made a cycle with the views delegated; lowering again without")
            gc.collect()
            edge = lower(None)
        delegation = {m: delegation_summary(edge, m) for m in (programs if isinstance(programs, dict) else ["forward"])}
        step("to_executorch")
        gc.collect()  # the partitioner's copies of each partition are garbage in reference cycles
        external = None
        if tied is not None:
            def external(node):
                spec_ = node.meta.get("spec")
                return PTD.removesuffix(".ptd") if tuple(getattr(spec_, "shape", ())) == tied else None

        with _serializer_hook(spill, tied is not None):
            prog = edge.to_executorch(backend_config(shared_state, external))
        # The serialized file is a Cord of references to the constant and delegate buffers
        # (spilled ones are files); drop the programs (graphs, lowered modules) before writing
        # it out, inside lean_lowering (which deletes the spilled files).
        pte, ptd = prog._pte_data, (prog._tensor_data or {}).get(PTD.removesuffix(".ptd"))
        del prog, edge
        gc.collect()
        step("writing the .pte" + (" and model.ptd" if ptd is not None else ""))
        return spill.join(pte, "model.pte"), delegation, spill.join(ptd, PTD) if ptd is not None else None
