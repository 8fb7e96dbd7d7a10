"""slmc's Python API: the same jobs as the CLI (`compile`, `validate`, `inspect`).

This is the face of the package: it may use the compiler, passes, targets and
runtime checks. The CLI is a thin layer over it.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from . import __version__
from .compiler.importers import load_model
from .compiler.ir import Model, QuantWeight, named_weights, param_count, weight_bytes
from .compiler.pass_manager import PASSES, PassManager, load_passes, parse_pass
from .compiler.serialize import is_ir_folder, load_ir
from .compiler.textdata import find_tokenizer_dir
from .errors import SlmcError, ValidationFailed
from .targets import get_target
from .targets.base import check_backend, check_output_path, check_supported, read_manifest, write_artifact

DEFAULT_MODEL = "default"


def resolve_model_path(path: str, keep_codes: bool = False) -> Path:
    """'default' is the built-in SmolLM2-135M-Instruct (converted once, then cached); with
    keep_codes it is the Q4_1 GGUF that model comes from, whose codes are then kept."""
    if path == DEFAULT_MODEL:
        from .default_model import default_gguf_path, default_model_dir

        return default_gguf_path() if keep_codes else default_model_dir()
    return Path(path)


def load(path: str | Path, max_seq_len: int | None = None, strict: bool = False,
         keep_codes: bool = False) -> Model:
    p = resolve_model_path(str(path), keep_codes)
    if is_ir_folder(p):
        m = load_ir(p)
        if max_seq_len is not None:
            from .compiler.importers.hf import check_max_seq_len

            check_max_seq_len(max_seq_len, m.max_position, "--max-seq-len")
            m.kv.max_len = max_seq_len
        return m
    return load_model(p, max_seq_len=max_seq_len, strict=strict, keep_codes=keep_codes)


def tokenizer_dir(model_path: Path) -> Path | None:
    return find_tokenizer_dir(model_path)


def _versions() -> dict:
    out = {"slmc": __version__, "python": platform.python_version()}
    for pkg in ("torch", "executorch", "coremltools", "ai-edge-litert", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def target_pipeline(target) -> list[str]:
    return list(getattr(target, "default_passes", ()))


def with_calibration(pipeline: list, calib: list[str]) -> list:
    """--calib FILE...: every data-aware pass without its own calib= gets these files,
    recorded as absolute paths (the manifest must say what the codes were fitted on)."""
    from .compiler.textdata import read_text

    if not calib:
        return pipeline
    files = []
    for f in calib:
        read_text(f)  # missing, empty, binary: exit 2 before any work
        files.append(str(Path(f).resolve()))
    out = []
    for p in pipeline:
        if any(f.name == "calib" for f in dataclasses.fields(p.options)) and not p.options.calib:
            p = type(p)(dataclasses.replace(p.options, calib=";".join(files)))
        out.append(p)
    return out


def calibration_files(pipeline: list) -> list[dict]:
    import hashlib

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


def compile_model(model: str | Path, target: str = "executorch", backend: str | None = None,
                  out: str | Path = "out", passes: list[str] = (), max_seq_len: int | None = None,
                  strict: bool = False, dump_ir: Path | None = None, progress=None,
                  recipe: str | None = None, calib: list[str] = (),
                  keep_codes: bool = False) -> tuple[Path, dict]:
    step = progress or (lambda msg: None)
    out = Path(out)
    check_output_path(out)  # fail before minutes of work, not after
    if dump_ir is not None and Path(dump_ir).exists() and not Path(dump_ir).is_dir():
        raise SlmcError(f"{dump_ir} exists and is a file, not a folder", "--dump-ir")
    tgt = get_target(target)
    spec = tgt.spec_class(backend=backend) if backend else tgt.spec_class()
    check_backend(tgt, spec)
    if recipe:
        from .recipes import recipe_passes

        passes = recipe_passes(recipe, tgt.name, spec.backend) + list(passes)
    pipeline = with_calibration([parse_pass(p) for p in list(passes) + target_pipeline(tgt)], calib)
    step("importing")
    src_path = resolve_model_path(str(model), keep_codes)
    ir = load(src_path, max_seq_len=max_seq_len, strict=strict, keep_codes=keep_codes)
    ir, logs = PassManager(pipeline, dump_dir=Path(dump_ir) if dump_ir else None, progress=step).run(ir)
    if ir.source.get("keep_codes"):
        ir, logs = fit_imported_codes(ir, tgt, spec, logs, dump_ir, step)
    check_supported(tgt, ir, spec)
    t0 = time.time()
    art = tgt.lower(ir, spec, progress=step)
    art.manifest.update({
        "slmc_manifest": 1,
        "target": tgt.name,
        "backend": spec.backend,
        "spec": dataclasses.asdict(spec),
        "model": {"family": ir.family, "architecture": ir.architecture, "params": param_count(ir),
                  "weight_bytes": weight_bytes(ir), "layers": ir.n_layers, "blocks": len(ir.blocks),
                  "vocab_size": ir.vocab_size, "hidden_size": ir.hidden_size,
                  "bos_id": ir.bos_id, "eos_ids": ir.eos_ids},
        "kv_cache_spec": dataclasses.asdict(ir.kv),
        "quantization": quant_summary(ir),
        "recipe": recipe,
        "calibration_files": calibration_files(pipeline),
        "source": dict(ir.source),
        "pipeline": [{"name": l.name, "options": l.options, "modified": l.modified, "seconds": l.seconds,
                      "info": l.info} for l in logs],
        "versions": _versions(),
        "compile_seconds": round(time.time() - t0, 2),
        "validation": None,
    })
    step("writing")
    tok = tokenizer_dir(src_path) or (tokenizer_dir(resolve_model_path(DEFAULT_MODEL))
                                      if str(model) == DEFAULT_MODEL else None)
    path = write_artifact(art, out, tok)
    return path, json.loads((path / "manifest.json").read_text())


def fit_imported_codes(ir: Model, tgt, spec, logs: list, dump_ir, step) -> tuple[Model, list]:
    """Imported codes the target cannot hold exactly are re-quantized into the nearest scheme
    it can (quant.requant), with the added error logged and kept in the manifest's pipeline
    (so `slmc validate` replays it). Codes the target can hold go in unchanged."""
    import logging

    from .targets.quant_rules import fit_passes

    fit = fit_passes(ir, tgt.quant_rules(spec))
    if not fit:
        return ir, logs
    ir, more = PassManager([parse_pass(p) for p in fit], dump_dir=Path(dump_ir) if dump_ir else None,
                           progress=step).run(ir)
    for lg in more:
        if lg.info.get("requantized"):
            logging.getLogger("slmc").warning(
                "%s/%s cannot hold the checkpoint's codes as they are (%s): re-quantized %d tensors, "
                "relative RMS error mean %.4f, max %.4f (%s)", tgt.name, spec.backend, lg.options.get("scope"),
                lg.info["requantized"], lg.info["rel_rms_err_mean"], lg.info["rel_rms_err_max"], lg.info["worst"])
    return ir, list(logs) + list(more)


def reference_model(folder: Path, manifest: dict) -> Model:
    """Rebuild the IR an artifact was compiled from: import its source, replay its passes."""
    src = manifest.get("source") or {}
    path = Path(src.get("path", ""))
    if not path.exists():
        raise SlmcError(f"the artifact's source model {path} is gone; pass --reference MODEL", str(folder))
    ir = load(path, max_seq_len=manifest["kv_cache_spec"]["max_len"], keep_codes=bool(src.get("keep_codes")))
    if src.get("sha256") and ir.source.get("sha256") != src["sha256"]:
        raise SlmcError(f"source model {path} changed since compile (sha256 differs)", str(folder))
    load_passes()
    pipeline = []
    for p in manifest.get("pipeline", []):
        cls = PASSES.get(p["name"])
        if cls is None:
            raise SlmcError(f"artifact was made with pass {p['name']!r}, unknown to this slmc", str(folder))
        pipeline.append(cls(cls.Options(**p["options"])))
    ir, _ = PassManager(pipeline).run(ir)
    return ir


def validate_artifact(folder: str | Path, steps: int = 32, prompt: str | None = None,
                      reference: str | Path | None = None, model: Model | None = None, record: bool = True):
    from .runtime_tests.validate import validate

    folder = Path(folder)
    manifest = read_manifest(folder)
    if model is None:
        model = load(reference, max_seq_len=manifest["kv_cache_spec"]["max_len"]) if reference \
            else reference_model(folder, manifest)
    report = validate(folder, manifest, model, steps=steps, prompt=prompt)
    if record:
        manifest["validation"] = json.loads(report.to_json())
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return report


def require_pass(report) -> None:
    if not report.passed:
        raise ValidationFailed(
            f"artifact disagrees with the reference: prefill |Δ|={report.prefill_max_abs:.3g}, decode "
            f"|Δ|={report.decode_max_abs:.3g}, top-1 {report.top1_agreement:.1%}, greedy "
            f"{'equal' if report.greedy_equal else 'differs'} (tolerance {report.tolerance})", report.artifact)


def evaluate(subject: str, texts: list[str], passes: list[str] = (), window: int = 512, stride: int = 256,
             max_tokens: int = 4096, reference: str | None = None):
    """Perplexity of a model (after `passes`) or of an artifact in its runtime; KL and top-1
    against the fp32 reference (the source model without passes, or `reference`)."""
    from .compiler.textdata import token_ids
    from .runtime_tests.evaluate import evaluate as run_eval

    if window < 2 or not 0 < stride <= window:
        raise SlmcError(f"need window >= 2 and 0 < stride <= window (got {window}, {stride})", "--window/--stride")
    p = Path(subject)
    if (p / "manifest.json").is_file():
        from .runtime_tests.sessions import open_session

        manifest = read_manifest(p)
        limit = manifest["kv_cache_spec"]["max_len"] - 1
        if window > limit:
            raise SlmcError(f"window {window} exceeds the artifact's KV cache ({limit} tokens)", "--window")
        subj, tok_dir = open_session(p, manifest), p
        ref = load(reference or manifest["source"]["path"])
    else:
        src = resolve_model_path(subject)
        subj, _ = PassManager([parse_pass(x) for x in passes]).run(load(src))
        tok_dir = tokenizer_dir(src) or (Path(subj.source.get("path", "")) if subj.source else None)
        ref = load(reference or src) if (passes or reference) else None
    if tok_dir is None:
        raise SlmcError("no tokenizer.json next to the model", subject)
    ids = token_ids(texts, Path(tok_dir) / "tokenizer.json", min_tokens=window + 1, max_tokens=max_tokens,
                    what="evaluation text")
    return run_eval(ids, subj, str(subject), ref, window=window, stride=stride)
