"""compile: model in, artifact folder out, with its manifest (slmc/manifest.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import logging
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..compiler.ir import (Model, QuantWeight, dequant_cache, drop_dequant_caches, named_weights, param_count,
                           read_through, weight_bytes)
from ..compiler.spill import trimming
from ..errors import SlmcError
from ..manifest import Manifest
from ..targets import get_target
from ..targets.base import check_backend, check_output_path, check_supported, page_out_weights, write_artifact
from .models import DEFAULT_MODEL, load, parse_passes, resolve_model_path, run_passes, tokenizer_dir, with_calibration
from .options import CompileOptions


def versions() -> dict:
    out = {"slmc": __version__, "python": platform.python_version()}
    for pkg in ("torch", "executorch", "coremltools", "ai-edge-litert", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def calibration_files(pipeline: list) -> list[dict]:
    seen = []
    for p in pipeline:
        for f in filter(None, getattr(p.options, "calib", "").split(";")):
            if f.strip() and f.strip() not in [x["path"] for x in seen]:
                path = Path(f.strip())
                sha = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
                seen.append({"path": str(path.resolve()), "sha256": sha})
    return seen


def quant_summary(ir: Model) -> dict | None:
    """How the artifact's weights are stored: tensor count per scheme (None: all float)."""
    schemes: dict[str, int] = {}
    algos = set()
    for _, w in named_weights(ir):
        if isinstance(w, QuantWeight):
            key = w.dtype + (f"+act_int{w.act_bits}" if w.act_bits else "")
            schemes[key] = schemes.get(key, 0) + 1
            algos.add(w.algorithm)
    if not schemes:
        return None
    return {"schemes": schemes, "algorithms": sorted(algos),
            "float_tensors": sum(1 for _, w in named_weights(ir) if not isinstance(w, QuantWeight))}


def model_summary(ir: Model) -> dict:
    return {"family": ir.family, "architecture": ir.architecture, "params": param_count(ir),
            "weight_bytes": weight_bytes(ir), "layers": ir.n_layers, "blocks": len(ir.blocks),
            "vocab_size": ir.vocab_size, "hidden_size": ir.hidden_size, "bos_id": ir.bos_id, "eos_ids": ir.eos_ids}


def _target_and_spec(target: str, backend: str | None):
    tgt = get_target(target)
    spec = tgt.spec_class(backend=backend) if backend else tgt.spec_class()
    check_backend(tgt, spec)
    return tgt, spec


def _recipe_passes(recipe: str, tgt, spec) -> list[str]:
    from ..recipes import recipe_passes

    return recipe_passes(recipe, tgt.name, spec.backend)


def compile_passes(recipe: str, target: str, backend: str | None = None) -> list[str]:
    """A recipe's passes as `compile` runs them for this target (its default backend if none)."""
    return _recipe_passes(recipe, *_target_and_spec(target, backend))


def compile(opts: CompileOptions, progress=None) -> tuple[Path, dict]:
    """Import, run the recipe's, your and the target's passes, lower, write `opts.out`.
    Returns the artifact folder and its manifest (the JSON object written)."""
    step = progress or (lambda msg: None)
    out, dump_ir = Path(opts.out), Path(opts.dump_ir) if opts.dump_ir is not None else None
    check_output_path(out)  # fail before minutes of work, not after
    if dump_ir is not None and dump_ir.exists() and not dump_ir.is_dir():
        raise SlmcError(f"{opts.dump_ir} exists and is a file, not a folder", "--dump-ir")
    tgt, spec = _target_and_spec(opts.target, opts.backend)
    passes = (_recipe_passes(opts.recipe, tgt, spec) if opts.recipe else []) + list(opts.passes)
    if opts.recipe:
        from ..recipes import check_calibration

        check_calibration(opts.recipe, opts.calib)
    pipeline = with_calibration(parse_passes(passes + list(getattr(tgt, "default_passes", ()))), opts.calib)
    step("importing")
    src_path = resolve_model_path(str(opts.model), opts.keep_codes)
    ir = load(src_path, max_seq_len=opts.max_seq_len, strict=opts.strict, keep_codes=opts.keep_codes)
    ir, logs = run_passes(ir, pipeline, dump_dir=dump_ir, progress=step)
    if ir.source.get("keep_codes"):
        ir, logs = fit_imported_codes(ir, tgt, spec, logs, dump_ir, step)
    tok = tokenizer_dir(src_path) or (tokenizer_dir(resolve_model_path(DEFAULT_MODEL))
                                      if str(opts.model) == DEFAULT_MODEL else None)
    return _lower_and_write(ir, tgt, spec, out, tok, step, logs, opts.recipe, calibration_files(pipeline))


def compile_ir(ir: Model, target: str, backend: str | None, out: str | Path, tokenizer: Path | None = None,
               progress=None, extra: dict | None = None) -> tuple[Path, dict]:
    """Lower an IR built in memory (passes already run) and write the artifact; `extra`
    fields go into the manifest beside the others (a benchmark's own notes)."""
    check_output_path(Path(out))
    tgt, spec = _target_and_spec(target, backend)
    return _lower_and_write(ir, tgt, spec, Path(out), tokenizer, progress or (lambda msg: None), [], None, [],
                            extra or {})


# set it to 1 to keep torch.fx's per-node source traces while lowering (torch's errors can then
# name the model line a failing node came from)
KEEP_TRACES_ENV = "SLMC_FX_STACK_TRACES"


@contextlib.contextmanager
def untraced_sources():
    """torch.fx records every node it traces with the Python stack that made it (captured and
    symbolized per node) for error messages. The exporters trace each graph several times
    (torch.export, run_decompositions, the targets' passes), and none of the artifacts keeps the
    traces: they come out byte-identical without (tests/test_reproducible.py), about 6 % sooner
    on LiteRT (bench/README's notes). Restored afterwards; KEEP_TRACES_ENV=1 keeps them."""
    import torch.fx.config as fx_config

    old = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = old or os.environ.get(KEEP_TRACES_ENV) != "1"
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = old


@dequant_cache(False)  # no fp32 copy of every quantized weight held into the lowering (issue 17)
@untraced_sources()
def _lower_and_write(ir, tgt, spec, out: Path, tok, step, logs, recipe, calib_files, extra=None):
    check_supported(tgt, ir, spec)
    # The check bundle's reference run reads every weight: done before lowering, not beside what
    # the lowering holds, and reading each from its file at each use (read_through), so it never
    # holds the whole model (bench/memory.py). Its bounds are set once the manifest names the flow.
    step("reference outputs for the on-device check bundle")
    from ..device.bundle import check_data

    drop_dequant_caches(ir)  # any a caller's own reference runs left (e.g. compile_ir after an eval)
    # trimming(weights=True): the file pages it reads (checkpoint floats, quantized tables in
    # scratch space) are let go as it goes; each forward reads the whole model (issue 17: 1.4 GB
    # of a 1B model's codes were resident by this step's end)
    with read_through(), trimming(0.25, weights=True):
        ref = check_data(ir, None, tok)
    t0 = time.time()
    gc.collect()  # what the passes replaced (e.g. unfused projections) goes before lowering copies the rest
    page_out_weights()  # the checkpoint pages the import and passes read (base.page_out_weights)
    art = tgt.lower(ir, spec, progress=step)
    gc.collect()
    page_out_weights()
    details = {**art.manifest, **(extra or {})}
    art.manifest = Manifest(
        format=details.pop("format"), artifact=details.pop("artifact"), target=tgt.name, backend=spec.backend,
        spec=dataclasses.asdict(spec), model=model_summary(ir), kv_cache_spec=dataclasses.asdict(ir.kv),
        quantization=quant_summary(ir), recipe=recipe, calibration_files=calib_files, source=dict(ir.source),
        pipeline=[{"name": l.name, "options": l.options, "modified": l.modified, "seconds": l.seconds,
                   "info": l.info} for l in logs],
        versions=versions(), compile_seconds=round(time.time() - t0, 2), details=details)
    step("making the on-device check bundle")
    art.files.update(check_bundle(ir, tgt, art, ref))
    step("writing")
    path = write_artifact(art, out, tok)
    from ..manifest import read_manifest

    return path, read_manifest(path)


def check_bundle(ir: Model, tgt, art, ref) -> dict[str, bytes]:
    """The artifact's `check/` folder (device/bundle.py): the reference's expected outputs for
    a few steps (`ref`, device.bundle.check_data), the flow's bounds and the target's own
    checker; the model files are unchanged."""
    from ..device.bundle import bounds_for, check_files

    manifest = art.manifest.to_json()
    data = dataclasses.replace(ref, bounds=bounds_for(ir, tgt.tolerance(manifest), ref.prompt, ref.tokens))
    return check_files(tgt, art, manifest, data)


def fit_imported_codes(ir: Model, tgt, spec, logs: list, dump_ir, step) -> tuple[Model, list]:
    """Imported codes the target cannot hold exactly are re-quantized into the nearest scheme
    it can (quant.requant), with the added error logged and kept in the manifest's pipeline
    (so `slmc validate` replays it). Codes the target can hold go in unchanged."""
    from ..targets.quant_rules import fit_passes

    fit = fit_passes(ir, tgt.quant_rules(spec))
    if not fit:
        return ir, logs
    ir, more = run_passes(ir, fit, dump_dir=dump_ir, progress=step)
    for lg in more:
        if lg.info.get("requantized"):
            logging.getLogger("slmc").warning(
                "%s/%s cannot hold the checkpoint's codes as they are (%s): re-quantized %d tensors, "
                "relative RMS error mean %.4f, max %.4f (%s)", tgt.name, spec.backend, lg.options.get("scope"),
                lg.info["requantized"], lg.info["rel_rms_err_mean"], lg.info["rel_rms_err_max"], lg.info["worst"])
    return ir, list(logs) + list(more)
