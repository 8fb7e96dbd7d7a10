"""litert_torch's default converter, one signature at a time.

litert_torch 0.10's `Converter.convert` (core.convert_signatures) exports every signature and
runs its FX passes on each, and only then lowers them to MLIR one after the other
(litert_converter.exported_programs_to_flatbuffer). Both exported programs and both lowered
modules stay referenced until that call returns: through the merge, the TFL passes and the
runtime constant folding, where the conversion's memory is highest (bench/results/memory.md's
notes: about 72 MiB of FX-graph objects there on SmolLM2-135M).

Here each signature is exported, passed, lowered and given its MLIR signature before the
next is exported, and its exported program is dropped as soon as its output names are read.
The lowered modules are dropped once merged. Every step is the one litert_torch's converter
calls, with the arguments it passes for slmc's conversion (no quant_config, no V2, int64 I/O
downcast), in the same order per signature; the one shared lowering context
(InlineConstsContext, which shares constants across signatures) is kept for the whole run.
It all runs with torch's lazy GraphModules, whose code is generated only when needed
(_lazy_graph_modules). The flatbuffer is byte-identical to the default converter's
(tests/test_tflite_staged.py).

litert_torch is pinned (pyproject.toml). Another version whose internals are not the ones read
here is refused with the reason, not converted some other way.
"""

from __future__ import annotations

import contextlib
import gc

from ...compiler.lowering.export import drop_last_trace
from ...errors import SlmcError

# what this module calls inside litert_torch 0.10, by module
_NEEDS = {"litert_torch._convert.core": ("export_torch_signature", "_run_convert_passes", "_warn_training_modules"),
          "litert_torch._convert.litert_converter": ("_get_output_names", "_warn_downcast_io", "LazyModelExporter",
                                                     "converter_api_ext", "passmanager")}


def _internals():
    import importlib

    mods = {}
    for name, attrs in _NEEDS.items():
        mod = importlib.import_module(name)
        missing = [a for a in attrs if not hasattr(mod, a)]
        if missing:
            raise SlmcError(f"litert_torch {_version()} lacks {name}.{', '.join(missing)}: slmc's staged "
                            "conversion reads litert-torch 0.10's internals; install the pinned version", "tflite")
        mods[name.rsplit(".", 1)[1]] = mod
    return mods["core"], mods["litert_converter"]


def _version() -> str:
    from importlib.metadata import version

    return version("litert-torch")


def convert_signatures(signatures, *, lightweight_conversion: bool = True):
    """signatures: litert_torch Signatures (Converter._signatures). Returns the exporter
    litert_torch's convert would wrap (LazyModelExporter: to_file writes the flatbuffer)."""
    with _lazy_graph_modules():
        return _convert(signatures, lightweight_conversion)


def _lazy_graph_modules():
    """torch's lazy GraphModules (what inductor uses): a recompile only marks the module, and
    its Python code is generated when it is first called or read. The export, its unlifting and
    decompositions recompile a whole-model graph again and again, each time for nothing; on a
    tiny Llama 52 code generations became 32 (tests/test_tflite_staged.py). The code is the
    same whenever it is made, so the flatbuffer is too. Without it (another torch), nothing
    changes but the time."""
    try:
        from torch.fx._lazy_graph_module import _use_lazy_graph_module
    except ImportError:
        return contextlib.nullcontext()
    return _use_lazy_graph_module(True)


def _convert(signatures, lightweight_conversion):
    core, lc = _internals()
    from litert_torch import backend
    from litert_torch import fx_infra
    from litert_torch.backend import inline_consts

    api = lc.converter_api_ext
    core._warn_training_modules(signatures)
    fx_infra.silence_torch_logs()
    ir_context = backend.export_utils.create_ir_context()
    shared = inline_consts.InlineConstsContext(enable_resource_constants=lightweight_conversion)
    modules = []
    for sig in signatures:
        program = core._run_convert_passes(core.export_torch_signature(sig, strict_export=False))
        lowered = backend.export.exported_program_to_mlir(program, ir_context=ir_context,
                                                          lowering_context_plugins=[shared])
        outputs = lc._get_output_names(program, lowered)
        del program
        drop_last_trace()  # torch's tracer holds its last graph (the lowering's re-trace) otherwise
        gc.collect()  # the graphs are reference cycles: gone before the next export, not at the end
        lc._warn_downcast_io(sig.name, sig.flat_arg_names, outputs, lowered)
        api.set_signature(lowered.module.operation, signature_name=sig.name,
                          input_names=sig.flat_arg_names, output_names=outputs)
        modules.append(lowered.module)
        del lowered
    merged = api.merge_modules(modules)
    del modules
    gc.collect()

    config = api.ConvertToTFLConfig()
    config.model_origin_framework = "PYTORCH"
    config.unsafe_fuse_dynamic_shaped_broadcast = True
    config.canonicalizing_inf_as_min_max_float = False  # litert_torch clamps infinities itself
    if hasattr(config, "enable_x64"):
        config.enable_x64 = False
    with ir_context:
        api.run_convert_to_tfl_passes(merged, lc.passmanager.PassManager(), config)
    if lightweight_conversion:  # runtime folding stands in for the constant folding skipped
        from litert_torch._convert import runtime_fold

        merged = runtime_fold.runtime_fold(ir_context, merged, fold_dequantize=True)
    return lc.LazyModelExporter(module=merged)
