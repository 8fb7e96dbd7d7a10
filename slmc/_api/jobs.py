"""validate, evaluate, inspect, run, catalog: the CLI's other jobs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..compiler.ir import Model
from ..errors import SlmcError, ValidationFailed, ValidationInconclusive
from ..manifest import read_manifest, record_validation
from .models import (load, parse_passes, pass_registry, reference_model, resolve_model_path, run_passes,
                     tokenizer_dir, with_calibration)
from .options import EvalOptions, InspectOptions, RunOptions, ValidateOptions


def validate(folder: str | Path, opts: ValidateOptions = ValidateOptions(), model: Model | None = None):
    """Run the artifact in its runtime beside the reference executor (`model`, else
    `opts.reference`, else the manifest's source with its passes replayed)."""
    from ..runtime_tests.validate import validate as run_validation

    folder = Path(folder)
    manifest = read_manifest(folder)
    if model is None:
        model = load(opts.reference, max_seq_len=manifest["kv_cache_spec"]["max_len"]) if opts.reference \
            else reference_model(folder, manifest)
    if opts.positions < 1:
        raise SlmcError(f"need at least 1 position (got {opts.positions})", "--positions")
    if opts.on:  # the artifact's check bundle on a device, judged here (slmc/device/validate.py)
        from ..device.validate import validate_on

        report = validate_on(folder, manifest, model, opts.on, steps=opts.steps, prompt=opts.prompt,
                             positions=opts.positions, long=opts.long, text=Path(opts.text) if opts.text else None)
    else:
        report = run_validation(folder, manifest, model, steps=opts.steps, prompt=opts.prompt,
                                positions=opts.positions, long=opts.long,
                                text=Path(opts.text) if opts.text else None)
    if opts.record:
        record_validation(folder, json.loads(report.to_json()))
    return report


def require_pass(report) -> None:
    """Raise unless the verdict is PASS: ValidationFailed (exit 1) on FAIL, ValidationInconclusive
    (exit 3) on INCONCLUSIVE, each with the verdict's reasons."""
    if report.verdict == "PASS":
        return
    why = "; ".join(report.reasons)
    if report.verdict == "INCONCLUSIVE":
        raise ValidationInconclusive(f"validation is inconclusive ({report.flow}): {why}", report.artifact)
    raise ValidationFailed(f"artifact disagrees with the reference ({report.flow}): {why}", report.artifact)


def evaluate_tokens(ids: list[int], subject, name: str, reference: Model | None, window: int = 512,
                    stride: int = 256):
    """Perplexity of `subject` (an IR or an artifact session) on token ids; KL and top-1
    against `reference` on the same windows when given."""
    from ..runtime_tests.evaluate import evaluate as run_eval

    return run_eval(ids, subject, name, reference, window=window, stride=stride)


def evaluate(subject: str, opts: EvalOptions):
    """Perplexity of a model (after `opts.passes`) or of an artifact in its runtime; KL and
    top-1 against the fp32 reference (the source model without passes, or `opts.reference`)."""
    from ..compiler.textdata import token_ids

    window, stride, reference = opts.window, opts.stride, opts.reference
    if window < 2 or not 0 < stride <= window:
        raise SlmcError(f"need window >= 2 and 0 < stride <= window (got {window}, {stride})", "--window/--stride")
    p = Path(subject)
    if opts.calib and not any(hasattr(q.options, "calib") for q in parse_passes(list(opts.passes))):
        raise SlmcError("--calib feeds the data-aware passes (quant.gptq, quant.awq, ...) given with --pass; "
                        "an artifact's calibration is fixed when it is compiled", "--calib")
    if (p / "manifest.json").is_file():
        from ..runtime_tests.sessions import open_session

        manifest = read_manifest(p)
        limit = manifest["kv_cache_spec"]["max_len"] - 1
        if window > limit:
            raise SlmcError(f"window {window} exceeds the artifact's KV cache ({limit} tokens)", "--window")
        subj, tok_dir = open_session(p, manifest), p
        ref = load(reference or manifest["source"]["path"])
    else:
        src = resolve_model_path(subject)
        subj, _ = run_passes(load(src), with_calibration(parse_passes(list(opts.passes)), opts.calib))
        tok_dir = tokenizer_dir(src) or (Path(subj.source.get("path", "")) if subj.source else None)
        ref = load(reference or src) if (opts.passes or reference) else None
    if tok_dir is None:
        raise SlmcError("no tokenizer.json next to the model", subject)
    ids = token_ids(list(opts.texts), Path(tok_dir) / "tokenizer.json", min_tokens=window + 1,
                    max_tokens=opts.max_tokens, what="evaluation text")
    return evaluate_tokens(ids, subj, str(subject), ref, window=window, stride=stride)


def inspect(model: str | Path, opts: InspectOptions = InspectOptions()) -> str:
    """The IR of `model` after `opts.passes`, as text (and saved as an IR folder if asked)."""
    from ..compiler.printer import print_model

    ir = load(model, max_seq_len=opts.max_seq_len, keep_codes=opts.keep_codes)
    ir, _ = run_passes(ir, opts.passes)
    text = print_model(ir)
    if opts.save_ir:
        from ..compiler.serialize import save_ir

        save_ir(ir, Path(opts.save_ir))
    return text


def run(artifact: str | Path, opts: RunOptions, on_text: Callable[[str], None] = lambda s: None) -> dict:
    """Generate text with the artifact in its own app-side runtime; streams pieces to
    `on_text`, returns token counts, tok/s, the runtime's name and the text."""
    from ..runtime_tests.generate import generate

    return generate(Path(artifact), opts.prompt, opts.max_new_tokens, opts.temperature, opts.chat, on_text=on_text)


@dataclass(frozen=True)
class Catalog:
    architectures: tuple[str, ...]
    passes: tuple[str, ...]
    targets: dict  # name -> its backends
    recipes: tuple  # (name, flows, about)
    recipe_quality: dict = None  # name -> what bench/results measured for it, or "not measured"


def catalog() -> Catalog:
    """What this slmc knows: architectures, passes, targets with their backends, recipes."""
    from ..compiler.families import supported_architectures
    from ..recipes import RECIPES, measured_quality
    from ..targets import TARGETS, load_all

    passes = pass_registry()
    load_all()
    return Catalog(architectures=tuple(supported_architectures()), passes=tuple(sorted(passes)),
                   targets={name: tuple(t.backends) for name, t in sorted(TARGETS.items())},
                   recipes=tuple((r.name, tuple(r.flows), r.about) for r in RECIPES.values()),
                   recipe_quality={r.name: measured_quality(r) for r in RECIPES.values()})
