"""LiteRT target: one `.tflite` with `prefill` and `decode` signatures sharing weights,
in the conventions of the LiteRT-LM runtime, plus a `.litertlm` bundle with the tokenizer.

Conventions followed (LiteRT-LM runtime/executor/litert_compiled_model_executor_utils.cc and
llm_litert_compiled_model_executor.cc; litert-torch generative/export_hf/core/exportable_module.py):
- signature "decode", and one whose name starts with "prefill" (the runtime finds it by that
  prefix and reads its chunk length from the size of `input_pos`);
- inputs `tokens` int32 [1, T] and `input_pos` int32 [T]; caches `kv_cache_k_{i}` /
  `kv_cache_v_{i}`, inputs and outputs of the same name; decode returns `logits`
  float32 [1, 1, vocab] (the runtime checks rank 3); prefill returns only the caches, as
  litert-torch's exporter does by default (the runtime samples from decode);
- the runtime treats caches as opaque buffers it swaps (on CPU: aliases) between calls, so
  the IR's layout (BHSD or BSHD) is kept as is;
- no `mask` input (optional for the runtime): the mask is built inside from positions, which
  also keeps per-layer sliding windows right.
Padding: the runtime fills a short prefill chunk with token 0 and position 0 after the real
tokens. The model reads only input_pos[0] and writes row i's K/V at input_pos[0] + i, so padded
rows land in still-unused slots after the real tokens (causally masked, overwritten later),
never on slot 0. A chunk must fit in the cache: input_pos[0] + T <= max_len.
A ring-buffer cache (kv.cache:window=W,sink_tokens=S) has W slots; prefill chunks are at most
W - S tokens, and there padded rows (input_pos 0 after the first) write back their slots' old
rows, so padding never evicts a live position.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ...compiler.ir import Model, QuantWeight, named_weights
from ...compiler.lowering import Components, LoweredLM, LoweringSpec, max_chunk
from ...compiler.lowering.attention import RowCacheAttention
from ...compiler.lowering.layers import LNorm, rope_slices
from ...errors import SlmcError
from ..base import Artifact, Target, TargetSpec, cache_axes, kv_refusal, page_out_weights, ring_manifest, scratch_file
from ..bounds import ACT8_STATISTICAL, FLOAT_EXACT
from .rules import LITERT
from .codes import store_codes
from .decompositions import pre_convert_decomposition_skipped
from .gpu import gpu_fallback
from .litertlm import litertlm_bundle, litertlm_plan
from .readback import readback
from . import staged
from .session import open_tflite
from .weights import PREFIX, Lifted, lifted_weights, quant_groups, sample_weights, splice

DEFAULT_PREFILL = 128


@dataclass(frozen=True)
class TFLiteSpec(TargetSpec):
    backend: str = "cpu"
    # Tokens per prefill call; None: min(128, max_len - 1) (the last prompt token always goes
    # through decode, so a prompt never needs more than max_len - 1 prefilled positions).
    prefill_len: int | None = None
    soc_model: str | None = None  # NPU backends: e.g. SM8650, MT6989; None: every SoC of the vendor
    bundle: bool = True  # also pack model.litertlm when the source has a tokenizer.json

    def __post_init__(self):  # `--backend cpu:prefill_len=64`
        name, _, opts = self.backend.partition(":")
        for item in filter(None, opts.split(",")):
            key, _, value = item.partition("=")
            if key != "prefill_len" or not value.isdigit() or int(value) < 1:
                raise SlmcError(f"unknown LiteRT option {item!r}; options: prefill_len=N (tokens per "
                                "prefill call, N >= 1)", "--backend")
            object.__setattr__(self, "prefill_len", int(value))

    @property
    def backend_name(self) -> str:
        return self.backend.partition(":")[0]


def prefill_length(model: Model, spec: TFLiteSpec) -> int:
    return spec.prefill_len or min(DEFAULT_PREFILL, max_chunk(model))


# --- NPU ahead-of-time compile: find the vendor SDK as ai_edge_litert.aot does -----------------

_NPU = {  # backend -> (ai_edge_litert vendor id, SDK package, libraries the compiler plugin loads)
    "qualcomm": ("qualcomm", "ai_edge_litert_sdk_qualcomm", ("libQnnHtp.so", "libQnnSystem.so")),
    "mediatek": ("mediatek", "ai_edge_litert_sdk_mediatek", ("libneuronusdk_adapter.mtk.so",)),
}
_NPU_HELP = {
    "qualcomm": "`pip install ai-edge-litert-sdk-qualcomm` (it downloads QAIRT 2.34 while installing), "
                "or download the Qualcomm AI Runtime SDK (QAIRT) and set QNN_SDK_ROOT=<qairt root> "
                "(slmc looks in $QNN_SDK_ROOT/lib/x86_64-linux-clang) or put that folder on LD_LIBRARY_PATH",
    "mediatek": "`pip install ai-edge-litert-sdk-mediatek` (it downloads NeuroPilot v8 while installing), "
                "or put the NeuroPilot SDK's host/lib folder (with libneuronusdk_adapter.mtk.so) on "
                "LD_LIBRARY_PATH",
}


def npu_sdk_dir(backend: str) -> tuple[Path | None, str]:
    """(folder holding the vendor libraries, or None; where slmc looked)."""
    _, pkg, libs = _NPU[backend]
    cands: list[Path] = []
    try:
        mod = __import__(pkg)
        p = mod.path_to_sdk_libs()
        if p:
            cands.append(Path(p))
    except (ImportError, NotImplementedError):
        pass
    if backend == "qualcomm" and os.environ.get("QNN_SDK_ROOT"):
        cands.append(Path(os.environ["QNN_SDK_ROOT"]) / "lib" / "x86_64-linux-clang")
    cands += [Path(d) for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    for d in cands:
        if all((d / lib).is_file() for lib in libs):
            return d, ""
    return None, f"{pkg} package, " + ("$QNN_SDK_ROOT, " if backend == "qualcomm" else "") + "LD_LIBRARY_PATH"


def _npu_refusal(backend: str, soc_model: str | None) -> str | None:
    vendor, _, libs = _NPU[backend]
    if not (platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")):
        return f"LiteRT NPU ahead-of-time compile for {vendor} runs on Linux x86_64 hosts only"
    try:
        from ai_edge_litert.aot.core import common

        common.get_resource(Path("tools/apply_plugin_main"))
        common.get_resource(Path(f"vendors/{vendor}/compiler"), is_dir=True)
    except (ImportError, FileNotFoundError):
        return f"ai_edge_litert's AOT tools (apply_plugin_main, the {vendor} compiler plugin) are missing"
    socs = [m.value for m in __import__(f"ai_edge_litert.aot.vendors.{vendor}.target", fromlist=["x"]).SocModel]
    if soc_model is not None and soc_model not in socs:
        return f"unknown {vendor} SoC {soc_model!r}; known: {', '.join(socs)}"
    found, looked = npu_sdk_dir(backend)
    if found is None:
        return (f"the {vendor} NPU compiler plugin needs the vendor SDK libraries ({', '.join(libs)}), "
                f"not found (looked in: {looked}). Install them: {_NPU_HELP[backend]}")
    return None


# --- lowering ------------------------------------------------------------------------------------

def cache_names(lm: LoweredLM, n_layers: int) -> list[str]:
    """The cache tensors in forward's order: k_0, v_0, ...; an int8 cache adds its per-token
    scales after each (k_0, k_scale_0, v_0, v_scale_0, ...)."""
    slots = ("k", "k_scale", "v", "v_scale") if lm.int8 else ("k", "v")
    return [f"{c.replace('_scale', '')}_scale_{d}" if c.endswith("_scale") else f"{c}_{d}"
            for d in range(n_layers) for c in slots]


class _Signature(nn.Module):
    """forward(tokens, input_pos, kv_cache={"k_0": .., "v_0": .., ...}) in LiteRT-LM's names:
    litert_torch names flattened kwargs `kv_cache_k_0`, ... (inputs and outputs alike)."""

    def __init__(self, lm: LoweredLM, n_layers: int, logits: bool):
        super().__init__()
        self.lm, self.n, self.logits = lm, n_layers, logits
        self.names = cache_names(lm, n_layers)

    def forward(self, tokens, input_pos, kv_cache):
        caches = [kv_cache[n] for n in self.names]
        # only the start position, or all of them where padding rows must be told apart
        pos = (input_pos if self.lm.spec.padded else input_pos[:1]).to(self.lm.spec.index_dtype)
        out = self.lm(tokens.long(), pos, *caches)
        res = {"kv_cache": {n: out[1 + i] for i, n in enumerate(self.names)}}
        if self.logits:
            res["logits"] = out[0].reshape(1, 1, -1)
        return res


class CompositeNorm(LNorm):
    """The norm component: RMSNorm as LiteRT's `odml.rms_norm` composite, which the runtime runs
    as one fused kernel (the plain ops it decomposes to are the fallback), on a rank-3 view:
    LiteRT's converter rejects some rank-4 tensors with a length-1 axis, like the q/k norms' in
    decode."""

    def __init__(self, n, P, channels_first: bool = False):
        super().__init__(n, P, channels_first)
        self.register_buffer("one", torch.ones(1, dtype=P.dtype), persistent=False)

    def forward(self, x):
        from litert_torch.generative.layers.normalization import rms_norm_with_hlfb

        y = rms_norm_with_hlfb(x.reshape(1, -1, x.shape[-1]), self.weight + self.offset, self.eps, self.one)
        return y.reshape(x.shape)


@contextlib.contextmanager
def _drop_runtime_asserts():
    """F.one_hot (MoE routing) exports a runtime check, aten._assert_async, which TFLite has no
    op for and litert_torch no lowering; the checked property (top-k indices >= 0) always
    holds, so lower the check to nothing while converting."""
    from litert_torch.backend.lowerings import registry

    op, ops = torch.ops.aten._assert_async.msg, registry.global_registry.registered_ops
    added = op not in ops
    if added:
        ops[op] = lambda lctx, *args, **kwargs: None
    try:
        yield
    finally:
        if added:
            ops.pop(op, None)


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _quiet():
    """litert_torch prints progress to stdout and its C++ side logs to fd 2; keep the CLI's
    streams clean (stdout may carry --json), but show the log if conversion fails."""
    log = tempfile.TemporaryFile()
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    except Exception as e:  # one line for the user, the converter's log tail for a bug report
        log.seek(0)
        tail = "\n".join(log.read().decode(errors="replace").splitlines()[-15:])
        raise SlmcError(f"LiteRT conversion failed: {e}\n{tail}", "tflite") from e
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()


@contextlib.contextmanager
def _converting():
    """How litert_torch runs here: quiet, without progress bars, runtime asserts dropped, one
    decomposition per signature (decompositions.py)."""
    with _env("LITERT_TORCH_SHOW_PROGRESS", "n"), _quiet(), _drop_runtime_asserts(), pre_convert_decomposition_skipped():
        yield


def _dus_rows(cache, axis: int, positions, rows):
    """T cache rows at positions[0] (the lowering's positions are start + i) as one TFLite
    DYNAMIC_UPDATE_SLICE, which the runtime can do in place; index_copy would become a generic
    stablehlo scatter over the whole cache."""
    start = positions[:1]
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

    zero = torch.zeros(1, dtype=torch.int32)
    idx = torch.cat([start.reshape(1).to(torch.int32) if i == axis else zero for i in range(cache.dim())])
    return dynamic_update_slice(cache, rows, [x for x in idx])


# LiteRT's decoder components: the composite norm, rotate-half as slices (no delegate keeps the
# graph whole, so the [hd, hd] matmul would only cost), cache rows by DYNAMIC_UPDATE_SLICE,
# attention matmuls that read the cache without a reshaped copy of it, and V caches by column
COMPONENTS = Components(norm=CompositeNorm, rope=rope_slices,
                        attention=RowCacheAttention(write_rows=_dus_rows, batched_einsum=True,
                                                    values_by_column=True))


def convert(model: Model, prefill_len: int, step=lambda msg: None, lift: bool = True) -> tuple[Path, dict]:
    """Both signatures through one litert_torch Converter: one flatbuffer, weights stored
    once; quantized weights are lowered as floats and their codes put in their place (codes.py).
    lift: the weight matrices go around the converter as signature inputs and are spliced
    back as shared constants (weights.py); False converts them as constants (the comparison
    in tests/test_tflite_weights.py). Returns the flatbuffer, as a file (base.scratch_file),
    and {weight path: how its codes are stored}."""
    import litert_torch

    # padded: a ring keeps its live slots under LiteRT-LM's prefill padding (input_pos 0 there)
    # int32 positions: no int64 arange for the converter to rewrite and re-trace for
    lm = LoweredLM(model, LoweringSpec(kv="io", positions="start", mask_input=False, index_dtype=torch.int32,
                                       padded=model.kv.window is not None,
                                       dequantize="shape" if lift else True, components=COMPONENTS)).eval()
    # the caches are tracing samples only: never read, so left unwritten (94 MiB at 2048 on
    # SmolLM2-135M, none of it resident)
    kv = dict(zip(cache_names(lm, model.n_layers), lm.empty_caches(zero=False)))
    lifted = lifted_weights(lm) if lift else []
    names = ["lm." + n for n, _ in lifted]

    def sample(T):
        kw = {"tokens": torch.zeros(1, T, dtype=torch.int32),
              "input_pos": torch.arange(T, dtype=torch.int32), "kv_cache": kv}
        return kw | ({PREFIX: sample_weights(lifted)} if lift else {})

    def signature(logits: bool):
        sig = _Signature(lm, model.n_layers, logits).eval()
        return Lifted(sig, names).eval() if lift else sig

    path = scratch_file("model.tflite")
    with _converting(), torch.no_grad():
        prefill, decode = signature(False), signature(True)
        conv = litert_torch.signature("prefill", prefill, sample_kwargs=sample(prefill_len))
        conv.signature("decode", decode, sample_kwargs=sample(1))
        # Memory (bench/memory.py): lightweight_conversion keeps the weights the converter
        # still sees as MLIR resources over the torch tensors instead of a dense copy of each
        # (the constants it no longer folds are folded by the LiteRT runtime afterwards,
        # litert_torch's default for it); one signature's exported program at a time
        # (staged.py); the flatbuffer goes to a file.
        edge = staged.convert_signatures(conv._signatures, lightweight_conversion=True)
        page_out_weights()  # the checkpoint pages read while converting (base.page_out_weights)
        edge.to_file(str(path))
        del edge, prefill, decode, conv  # the MLIR module
    # their graphs are reference cycles: collected now, not at some later allocation, so the
    # heap trimming (slmc._api.compile) returns them before the weights are read back in
    gc.collect()
    if lift:
        step("litert: weights into the flatbuffer")
        spliced, layout = splice(path, lifted, quant_groups(model, lm, lifted))
        path.unlink()
        return spliced, layout
    del lm
    if not any(isinstance(w, QuantWeight) for _, w in named_weights(model)):
        return path, {}
    step("litert: quantized codes into the flatbuffer")
    out = store_codes(path, model)
    path.unlink()
    return out


def signature_io(data: bytes | Path) -> dict:
    """Each signature's inputs/outputs as the interpreter sees them."""
    from ai_edge_litert.interpreter import Interpreter

    def order(name):  # tokens, input_pos, then caches by layer, K before V
        if name.startswith("kv_cache_"):
            c, d = name[len("kv_cache_"):].rsplit("_", 1)
            return (2, int(d), c)
        return ({"tokens": 0, "input_pos": 1, "logits": 0}.get(name, 3), 0, name)

    it = Interpreter(model_path=str(data)) if isinstance(data, Path) else Interpreter(model_content=data)
    io = {}
    for sig in it.get_signature_list():
        r = it.get_signature_runner(sig)
        io[sig] = {kind: [{"name": n, "dtype": d["dtype"].__name__, "shape": d["shape"].tolist()}
                          for n, d in sorted(details.items(), key=lambda kv: order(kv[0]))]
                   for kind, details in (("inputs", r.get_input_details()), ("outputs", r.get_output_details()))}
    return io


# --- .litertlm bundle ------------------------------------------------------------------------------

class TFLiteTarget(Target):
    name = "tflite"
    backends = ("cpu", "qualcomm", "mediatek")
    host_backends = ("cpu",)
    spec_class = TFLiteSpec
    formats = ("tflite",)
    tolerances = {
        ("cpu", "float"): FLOAT_EXACT,
        # weight-only codes are dequantized to the reference's exact floats: float tolerance
        ("cpu", "quant"): FLOAT_EXACT,
        # int8-activation filters run in XNNPACK's qd8 GEMMs, as ExecuTorch's 8da4w does
        ("cpu", "quant-act8"): ACT8_STATISTICAL,
    }

    def open_session(self, folder, manifest):
        return open_tflite(folder, manifest)

    def readback(self, model, artifact):
        return readback(model, artifact)

    def hidden_states(self, model, manifest, ids):
        from .intermediates import hidden_states

        lm = self._debug_lm(model)
        return hidden_states(model, ids, lm, cache_names(lm, model.n_layers), _converting)

    def debug_program(self, model, manifest, ids) -> tuple[bytes, str]:
        """hidden_states' debug .tflite as bytes (run on a device by validate --by-block --on)."""
        from .intermediates import HOW, debug_model

        lm = self._debug_lm(model)
        return debug_model(model, ids, lm, cache_names(lm, model.n_layers), _converting), HOW

    @staticmethod
    def _debug_lm(model):
        return LoweredLM(model, LoweringSpec(kv="io", positions="start", full_logits=True, dequantize=True,
                                             padded=model.kv.window is not None, components=COMPONENTS)).eval()

    def quant_rules(self, spec):
        return LITERT

    def supports(self, model: Model, spec: TFLiteSpec) -> str | None:
        why = kv_refusal(model, "LiteRT signature I/O", ("float32", "float16", "int8"), ring=None,
                         arena="LiteRT-LM binds one kv_cache_k_{i} / kv_cache_v_{i} buffer per layer by name")
        if why:
            return why
        kv = model.kv
        if any(isinstance(w, QuantWeight) for _, w in named_weights(model)):
            why = LITERT.check(model)
            if why:
                return why
        P = prefill_length(model, spec)
        if not 1 <= P <= kv.max_len - 1:
            return f"prefill length {P} must be in 1..max_len-1={kv.max_len - 1}"
        if P > max_chunk(model):  # a chunk's rows must land in distinct ring slots
            return (f"prefill length {P} exceeds the ring buffer's {max_chunk(model)} non-sink slots "
                    f"(window={kv.window}, sink_tokens={kv.sink_tokens}); use --backend cpu:prefill_len=N "
                    "with a smaller N")
        if spec.backend_name in _NPU:
            return _npu_refusal(spec.backend_name, spec.soc_model)
        return None

    def lower(self, model: Model, spec: TFLiteSpec, progress=None) -> Artifact:
        step = progress or (lambda msg: None)
        P = prefill_length(model, spec)
        bundle = spec.bundle and spec.backend_name not in _NPU
        plan = litertlm_plan(model) if bundle else None  # before the conversion (litertlm.py)
        step("litert_torch: prefill + decode signatures")
        data, codes = convert(model, P, step)
        manifest = {
            "format": "tflite",
            "artifact": "model.tflite",
            "io": signature_io(data),
            "prefill_len": P,
            "positions": ("input_pos[0] is the chunk's start position; rows are at input_pos[0] + i and "
                          "the rest of input_pos is ignored (LiteRT-LM fills padding with 0; a ring cache "
                          "reads it to keep its slots under padding). A chunk "
                          "must satisfy input_pos[0] + T <= max_len."),
            "kv_cache": {"kind": "signature_io", "names": ["kv_cache_k_{i}", "kv_cache_v_{i}"] + (
                             ["kv_cache_k_scale_{i}", "kv_cache_v_scale_{i}"] if model.kv.dtype == "int8" else []),
                         "scales": ("int8 codes; float32 scale per token and KV head "
                                    "(symmetric, max|x| / 127), same axes with head_dim 1")
                         if model.kv.dtype == "int8" else None,
                         "layout": model.kv.layout, "dtype": model.kv.dtype, "max_len": model.kv.max_len,
                         **cache_axes(model, COMPONENTS.attention.columns(model.kv)), **ring_manifest(model)},
            "runner": {"convention": "LiteRT-LM LlmLiteRtCompiledModelExecutor",
                       "prefill_logits": False, "decode_logits": "[1, 1, vocab]"},
            "gpu_delegate_fallback": gpu_fallback(data),
        }
        if codes:
            manifest["quantized_weights"] = {
                "storage": "slmc's codes as INT4/INT8 constants shared by both signatures: dequantized "
                           "before float matmuls and lookups (scales and zeros as constant buffers), or, "
                           "for int8-activation weights, the FULLY_CONNECTED filter itself; per tensor below",
                "tensors": codes}
        files = {"model.tflite": data}
        if spec.backend_name in _NPU:
            step(f"ai_edge_litert.aot: {spec.backend_name} NPU compile")
            files, manifest["npu"] = self._aot(data, spec)
            manifest["artifact"] = sorted(files)[0]
            manifest["litertlm"] = {"file": None, "reason": "not bundled: LiteRT-LM's NPU executor expects "
                                    "litert-torch's NPU export (split caches, external embedder)"}
        elif spec.bundle:
            step("litert_lm_builder: .litertlm bundle")
            packed, manifest["litertlm"] = litertlm_bundle(model, data, plan)
            if packed is not None:
                files["model.litertlm"] = packed
        else:
            manifest["litertlm"] = {"file": None, "reason": "bundle=False"}
        return Artifact(files=files, manifest=manifest)

    def _aot(self, data: bytes | Path, spec: TFLiteSpec) -> tuple[dict, dict]:
        from ai_edge_litert.aot import aot_compile
        from ai_edge_litert.aot.core import aot_types
        from ai_edge_litert.aot.vendors import import_vendor

        vendor = _NPU[spec.backend_name][0]
        backend = import_vendor.import_vendor(vendor)
        mod = __import__(f"ai_edge_litert.aot.vendors.{vendor}.target", fromlist=["Target"])
        target = mod.Target(mod.SocModel(spec.soc_model or "ALL"))
        found, _ = npu_sdk_dir(spec.backend_name)  # apply_plugin passes LD_LIBRARY_PATH on to the plugin
        lib_path = os.pathsep.join(filter(None, [found and str(found), os.environ.get("LD_LIBRARY_PATH")]))
        with _env("LD_LIBRARY_PATH", lib_path):
            res = aot_compile.aot_compile(aot_types.Model.create_from_bytes(
                data.read_bytes() if isinstance(data, Path) else data), target=target,
                                          keep_going=False)
        if not res.models_with_backend:
            raise SlmcError(f"NPU compile failed: {res.failed_backends}", f"tflite/{spec.backend_name}")
        files, stats = {}, {}
        for b, m in res.models_with_backend:
            name = f"model{b.target_id_suffix}.tflite"
            files[name] = m.model_bytes
            ps = getattr(m, "partition_stats", None)
            stats[name] = [vars(s) for s in ps.subgraph_stats] if ps else None
        return files, {"vendor": vendor, "backend_id": backend.id(), "soc_model": spec.soc_model or "ALL",
                       "partition_stats": stats,
                       "note": "fp32 graph as compiled; vendor NPUs mostly want int8/int16 (a16w8) models"}

