"""Core ML target: an ML Program `.mlpackage` that swift-transformers' `LanguageModel` loads unmodified.

Conventions (swift-transformers Sources/Models/LanguageModel.swift and its
Examples/Mistral7B/export.py, the exporter it is tested with):
- input `inputIds` int32 [1, T], T a range; `causalMask` float16 [1, 1, T, E], an
  additive mask over keys [0, E); the start position is E - T (taken from the shapes);
- states `keyCache` / `valueCache` (fp16: Core ML states are fp16 only), found by name;
  swift-transformers only needs the names, so slmc stacks layers as [layers, kvh, L, hd]
  (rank 4, ANE-friendly) rather than the example's [layers, 1, kvh, L, hd];
- output `logits` [1, T, vocab] (it reads row T - 1), fp16 when computing in fp16;
- user metadata `co.huggingface.exporters.name` names the model (tokenizer lookup).
The model also applies causal and sliding-window masking itself, so a zero mask (what
swift-transformers sends) is valid. The default function `prefill` takes any T and serves
swift-transformers alone; `decode` (T = 1) shares its weights and state layout.
Deployment targets before iOS 18 have no states or multifunction: one function `main` with
the caches as inputs `keyCache`/`valueCache` and outputs `presentKeys`/`presentValues`.

`--backend` names the compute units (cpu|gpu|ane|all) with options, `ane:deployment_target=
ios17,precision=fp16,kv=io,layout=ane`; `ane` selects the Neural Engine layout (module.py).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ...compiler.ir import Model, QuantWeight, named_weights
from ...compiler.spill import page_out_weights, trimming
from ...errors import SlmcError
from ..base import Artifact, Target, TargetSpec, scratch_file
from ..bounds import FLOAT_EXACT, FP16_STATISTICAL
from .lean import lean_conversion
from .reshape_solve import solved_once
from .validate_once import validated_once
from ..coreml_import import coremltools
from .names import fresh_op_names
from . import merge
from .module import coreml_module
from .readback import readback
from .session import open_coreml
from .rules import coreml_rules

PACKAGE = "model.mlpackage"
COMPUTE_UNITS = {"cpu": "CPU_ONLY", "gpu": "CPU_AND_GPU", "ane": "CPU_AND_NE", "all": "ALL"}
DEPLOYMENT = ("ios15", "ios16", "ios17", "ios18")
OPTIONS = {"precision": ("fp16", "fp32"), "deployment_target": DEPLOYMENT,
           "kv": ("auto", "states", "io"), "layout": ("auto", "standard", "ane")}


@dataclass(frozen=True)
class CoreMLSpec(TargetSpec):
    """`backend` names the compute units and may carry options, `UNITS[:k=v,...]`
    (e.g. `ane`, `cpu:precision=fp32`, `all:deployment_target=ios17`)."""

    backend: str = "all"
    precision: str = "fp16"
    deployment_target: str = "ios18"
    kv: str = "auto"  # auto: states where the deployment target has them, else I/O
    layout: str = "auto"  # auto: the ANE layout for compute units `ane`

    def __post_init__(self):
        _, _, opts = self.backend.partition(":")
        for item in filter(None, opts.split(",")):
            key, eq, value = item.partition("=")
            if key not in OPTIONS or not eq:
                raise SlmcError(f"unknown Core ML option {item!r}; options: "
                                + ", ".join(f"{k}={'|'.join(v)}" for k, v in OPTIONS.items()), "--backend")
            object.__setattr__(self, key, value)
        for key, allowed in OPTIONS.items():
            if getattr(self, key) not in allowed:
                raise SlmcError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}", "--backend")
        why = self.conflict()
        if why:  # before any model is read
            raise SlmcError(why, "--backend")

    def conflict(self) -> str | None:
        """Why these options cannot go together (None: they can)."""
        dt = self.deployment_target
        if self.units == "ane" and dt < "ios16":
            return f"compute units `ane` (MLComputeUnits.cpuAndNeuralEngine) need iOS 16+, not {dt}"
        if self.units == "ane" and self.precision == "fp32":
            return "the Neural Engine computes in fp16 only: precision=fp32 cannot run on compute units `ane`"
        if self.kv == "states" and dt < "ios18":
            return f"a stateful KV cache (Core ML states) needs iOS 18+, not {dt}; use kv=io"
        if self.stateful and self.precision == "fp32":
            return ("Core ML states hold fp16 only, so an fp32 artifact cannot keep its KV cache in states; "
                    "use kv=io (cache as inputs/outputs) or precision=fp16")
        return None

    @property
    def backend_name(self) -> str:
        return self.backend.partition(":")[0]

    @property
    def units(self) -> str:
        return self.backend_name

    @property
    def stateful(self) -> bool:
        return self.kv == "states" or (self.kv == "auto" and self.deployment_target >= "ios18")

    @property
    def ane_layout(self) -> bool:
        return self.layout == "ane" or (self.layout == "auto" and self.units == "ane")


def refusal(model: Model, spec: CoreMLSpec) -> str | None:
    """Why this model cannot become a Core ML artifact under `spec` (None: it can)."""
    if spec.conflict():
        return spec.conflict()
    kv = model.kv
    if kv.dtype == "float16" and cache_dtype(model, spec) != "float16":
        return f"an fp16 KV cache as inputs/outputs needs iOS 16+ (fp16 I/O), not {spec.deployment_target}"
    if kv.window is not None:
        return (f"a ring-buffer KV cache (window={kv.window}) is not lowered for Core ML: the app hands "
                "the model swift-transformers' causalMask over slots 0..E, which means slot = position; "
                "a ring would make that mask wrong. Use executorch or tflite for a ring cache")
    # arena=true is what this target always builds: keyCache/valueCache hold every layer,
    # each depth a view [d] (swift-transformers' contract), so it needs no refusal
    if kv.dtype not in ("float32", "float16"):
        return (f"KV cache dtype={kv.dtype}: Core ML keeps a float cache (fp32/fp16) only")
    if any(isinstance(w, QuantWeight) for _, w in named_weights(model)):
        if spec.ane_layout:
            return ("the Neural Engine layout rewrites weights into 1x1 convolutions, which slmc does "
                    "not do for quantized weights yet; use compute units cpu, gpu or all")
        why = coreml_rules(spec).check(model)
        if why:
            return why
    shapes = {(model.block_at(d).attn.n_kv_heads, model.block_at(d).attn.head_dim) for d in range(model.n_layers)}
    if len(shapes) != 1:
        return f"keyCache/valueCache stack every layer, which needs one (kv_heads, head_dim); got {sorted(shapes)}"
    return None


def _quiet(fn, *a, **kw):
    """coremltools draws tqdm bars on stderr; the CLI keeps stderr for the outcome."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **kw)


def cache_dtype(model: Model, spec: CoreMLSpec) -> str:
    """States are fp16; an I/O cache is fp16 when the compute or the IR's KV spec is (iOS 16+)."""
    fp16 = spec.precision == "fp16" or model.kv.dtype == "float16"
    return "float16" if spec.stateful or (fp16 and spec.deployment_target >= "ios16") else "float32"


def _function_io(model: Model, spec: CoreMLSpec, module, fn: str) -> dict:
    L, flex = model.kv.max_len, fn != "decode"
    t = f"1..{L - 1}" if flex else 1
    fp16_io = spec.deployment_target >= "ios16"  # Core ML takes fp16 inputs/outputs from iOS 16
    half = "float16" if spec.precision == "fp16" and fp16_io else "float32"
    mask = "float16" if fp16_io else "float32"  # swift-transformers always sends a Float16 mask
    io = {"inputs": [
        {"name": "inputIds", "dtype": "int32", "shape": [1, t]},
        {"name": "causalMask", "dtype": mask, "shape": [1, 1, t, f"1..{L - 1}"],
         "meaning": "additive mask over keys [0, E); start position = E - T; causal and sliding-window "
                    "masking are also applied inside, so zeros are valid"}],
        "outputs": [{"name": "logits", "dtype": half, "shape": [1, t, model.vocab_size]}]}
    cache = {"dtype": cache_dtype(model, spec), "shape": list(module.cache_shape)}
    if spec.stateful:
        io["states"] = [{"name": n, **cache, "dtype": "float16"} for n in ("keyCache", "valueCache")]
    else:
        io["inputs"] += [{"name": n, **cache} for n in ("keyCache", "valueCache")]
        io["outputs"] += [{"name": n, **cache} for n in ("presentKeys", "presentValues")]
    return io


@contextlib.contextmanager
def _deterministic_broadcast():
    """coremltools broadcasts symbolic dims with `list(set_of_symbols)[0]` (frontend/_utils.py
    pymil_broadcast_shapes): which equal symbol wins, and so which tensor's shape op the program
    reads, followed set order, and identical inputs gave different programs (979 vs 985 ops).
    The symbols are equal by construction; taking the first made (_creation_order) makes the
    choice stable."""
    from coremltools.converters.mil.frontend import _utils
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    original = _utils.pymil_broadcast_shapes

    def stable(shapes):
        out = original(shapes)
        rank = len(out)
        padded = [[1] * (rank - len(s)) + list(s) for s in shapes]
        for i in range(rank):
            syms = sorted({s[i] for s in padded if is_symbolic(s[i])}, key=_creation_order)
            ints = {s[i] for s in padded if not is_symbolic(s[i])}
            if syms and ints <= {1}:
                out[i] = syms[0]
        return out

    _utils.pymil_broadcast_shapes = stable
    fresh_op_names()
    try:
        yield
    finally:
        _utils.pymil_broadcast_shapes = original


def _creation_order(symbol) -> tuple[int, str]:
    """Unnamed symbols are "is<N>" from a process-wide count that is never reset: by name alone,
    is100 sorts before is99, so the choice followed how many symbols the process had made before
    (a conversion starting at 95 gave another program than one starting at 0). Shorter first,
    then by name, is the count's order whatever it started at."""
    return len(str(symbol)), str(symbol)


def convert_function(model: Model, spec: CoreMLSpec, fn: str, out: Path, module=None) -> dict:
    """torch.export one function of the package and convert it; returns its I/O description."""
    import numpy as np
    from torch.export import Dim

    ct = coremltools()

    module = (module or coreml_module(model, spec.stateful, spec.precision == "fp16")).eval()
    io = _function_io(model, spec, module, fn)
    L, flex = model.kv.max_len, fn != "decode"
    # max L - 1: a Dim whose max equals a static size (the cache) gets specialised by export
    T, E = Dim("T", min=1, max=L - 1), Dim("E", min=1, max=L - 1)
    tn = 2 if flex else 1
    args = [torch.zeros(1, tn, dtype=torch.int32), torch.zeros(1, 1, tn, tn + 3)]
    shapes = [{1: T} if flex else None, {2: T, 3: E} if flex else {3: E}]
    if not spec.stateful:
        args += [torch.zeros(module.cache_shape), torch.zeros(module.cache_shape)]
        shapes += [None, None]
    with torch.no_grad():
        ep = torch.export.export(module, tuple(args), dynamic_shapes=tuple(shapes), strict=False)
        ep = ep.run_decompositions({})
    np_dt = {"int32": np.int32, "float16": np.float16, "float32": np.float32}
    rt, re = ct.RangeDim(1, L - 1, default=tn), ct.RangeDim(1, L - 1, default=tn + 3)
    dims = {"inputIds": (1, rt if flex else 1), "causalMask": (1, 1, rt if flex else 1, re)}
    inputs = [ct.TensorType(name=i["name"], shape=dims.get(i["name"], tuple(i["shape"])), dtype=np_dt[i["dtype"]])
              for i in io["inputs"]]
    outputs = [ct.TensorType(name=o["name"], dtype=np_dt[o["dtype"]]) for o in io["outputs"]]
    states = [ct.StateType(ct.TensorType(shape=tuple(s["shape"]), dtype=np.float16), name=s["name"])
              for s in io.get("states", [])]
    with _deterministic_broadcast(), lean_conversion(), validated_once(), solved_once():
        ml = _quiet(ct.convert, ep, inputs=inputs, outputs=outputs, states=states or None,
                    convert_to="mlprogram", skip_model_load=True,
                    minimum_deployment_target=getattr(ct.target, "iOS" + spec.deployment_target[3:]),
                    compute_precision=ct.precision.FLOAT16 if spec.precision == "fp16" else ct.precision.FLOAT32,
                    compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[spec.units]))
    # ct.convert wrote the package to a temporary folder that stays until the interpreter exits
    # (2 x the fp16 weights on disk per compile, left behind by a killed one); ml.save would copy
    # it: moved instead, and the spec (coremltools edits it after writing) saved as ml.save does
    shutil.move(ml.package_path, out)
    ct.utils.save_spec(ml.get_spec(), str(merge.package_files(out)[0]))
    return io


def _set_metadata(package: Path, meta: dict, description: str) -> None:
    """Write user metadata into the package's spec (after multifunction merging, which drops it)."""
    from coremltools.proto import Model_pb2

    path = merge.package_files(package)[0]
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    spec.description.metadata.userDefined.update({k: str(v) for k, v in meta.items()})
    spec.description.metadata.shortDescription = description
    spec.description.metadata.author = "slmc"
    path.write_bytes(spec.SerializeToString(deterministic=True))  # map fields in key order: same bytes


def _stable_package_ids(package: Path) -> None:
    """coremltools names each item of the package's Manifest.json by a random uuid4, so identical
    inputs gave different bytes. The ids only need to be unique within the package: derive each
    from its item's path (uuid5), keeping the same structure and the root item."""
    import json
    import uuid

    path = package / "Manifest.json"
    man = json.loads(path.read_text())
    ids = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"slmc:mlpackage:{item['path']}"))
           for old, item in man["itemInfoEntries"].items()}
    man["itemInfoEntries"] = {ids[k]: v for k, v in man["itemInfoEntries"].items()}
    man["rootModelIdentifier"] = ids[man["rootModelIdentifier"]]
    path.write_text(json.dumps(man, indent=4, sort_keys=True))


def conventions(model: Model, spec: CoreMLSpec) -> dict:
    io = "inputs keyCache/valueCache, returned updated as presentKeys/presentValues"
    return {
        "compatible_with": "swift-transformers LanguageModel (Sources/Models/LanguageModel.swift)" if spec.stateful
                           else "Core ML apps (swift-transformers' LanguageModel refuses a KV cache as I/O)",
        "start_position": "causalMask.shape[-1] - inputIds.shape[1]",
        "logits": "every input position, [1, T, vocab]; the next token's scores are row T - 1",
        "kv_cache": "states keyCache/valueCache, all layers stacked" if spec.stateful else io,
        "cache_layout": f"[layers, {'L, kv_heads' if model.kv.layout == 'bshd' else 'kv_heads, L'}, head_dim]",
        "metadata": {"co.huggingface.exporters.name": "the model's name (swift-transformers' modelName)"},
    }


class CoreMLTarget(Target):
    name = "coreml"
    backends = tuple(COMPUTE_UNITS)
    spec_class = CoreMLSpec
    # Checked here by slmc's MIL interpreter (tolerance by precision). The first runs every
    # family: fp32 with the cache as I/O, the one combination with no fp16 rounding at all.
    host_backends = ("cpu:precision=fp32,kv=io", "all", "ane", "gpu:deployment_target=ios17")

    formats = ("mlpackage",)
    # Core ML on Linux is checked by slmc's MIL interpreter; keyed by compute precision
    # (tolerance_key), as fp16 compute rounds every op.
    tolerances = {
        ("fp32", "float"): FLOAT_EXACT,
        ("fp16", "float"): FP16_STATISTICAL,  # fp16 compute: judged statistically (bounds.py)
        # codes dequantize exactly; what is left is the compute precision's own rounding
        ("fp32", "quant"): FLOAT_EXACT,
        ("fp16", "quant"): FP16_STATISTICAL,
    }

    def tolerance_key(self, manifest):
        return manifest.get("precision")

    def quant_rules(self, spec):
        return coreml_rules(spec)

    def open_session(self, folder, manifest):
        return open_coreml(folder, manifest)

    def readback(self, model, artifact):
        return readback(model, artifact)

    def hidden_states(self, model, manifest, ids):
        from .intermediates import hidden_states

        spec = CoreMLSpec(**manifest["spec"])
        return hidden_states(model, manifest, ids, spec, COMPUTE_UNITS[spec.units], _quiet)

    def supports(self, model: Model, spec: CoreMLSpec) -> str | None:
        return refusal(model, spec)

    def lower(self, model: Model, spec: CoreMLSpec, progress=None) -> Artifact:
        step = progress or (lambda msg: None)
        multi = spec.deployment_target >= "ios18"  # multifunction packages need iOS 18 too
        fns = ("prefill", "decode") if multi else ("main",)
        with tempfile.TemporaryDirectory(prefix="slmc-coreml-") as tmp:
            tmp, ios = Path(tmp), {}
            module = coreml_module(model, spec.stateful, spec.precision == "fp16", spec.ane_layout)
            with trimming(weights=True):  # coremltools frees per-pass copies and reads each weight once
                for fn in fns:
                    step(f"torch.export + coremltools: {fn}")
                    ios[fn] = convert_function(model, spec, fn, tmp / f"{fn}.mlpackage", module)
                    page_out_weights()  # the fp32 pages the conversion read (saved as fp16/fp32 now)
            del module
            pkg = tmp / PACKAGE
            if multi:
                step("merging prefill and decode (shared weights)")
                merge.merge_functions({fn: tmp / f"{fn}.mlpackage" for fn in fns}, "prefill", pkg)
            else:
                (tmp / "main.mlpackage").rename(pkg)
            name = Path(str(model.source.get("path", "model"))).name or "model"
            meta = {"co.huggingface.exporters.name": name, "co.huggingface.exporters.task": "text-generation",
                    "slmc.max_context": model.kv.max_len - 1, "slmc.compute_units": spec.units,
                    "slmc.precision": spec.precision}
            _set_metadata(pkg, meta, f"{model.architecture} compiled by slmc ({spec.precision})")
            _stable_package_ids(pkg)
            files = {}  # scratch files, not bytes: the weights stay out of RAM
            for p in sorted(pkg.rglob("*")):
                if p.is_file():
                    files[f"{PACKAGE}/{p.relative_to(pkg).as_posix()}"] = moved = scratch_file(p.name)
                    shutil.move(p, moved)
        manifest = {
            "format": "mlpackage",
            "artifact": PACKAGE,
            "precision": spec.precision,
            "compute_units": {"name": spec.units, "coremltools": COMPUTE_UNITS[spec.units]},
            "deployment_target": spec.deployment_target,
            "layout": "ane" if spec.ane_layout else "standard",
            "default_function": fns[0],
            "io": ios,
            "kv_cache": {"kind": "states" if spec.stateful else "io", "dtype": cache_dtype(model, spec),
                         "ir_dtype": model.kv.dtype, "layout": model.kv.layout,
                         "why_dtype": "Core ML states are fp16 only; an fp16 program stores fp16 K/V"},
            "conventions": conventions(model, spec),
            "metadata": meta,
        }
        return Artifact(files=files, manifest=manifest)

