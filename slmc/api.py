"""slmc's Python API: the one entry for the CLI, the benchmarks and your scripts.

Jobs (the CLI's commands), each taking a frozen options object:
    compile(CompileOptions(model, target=..., backend=..., out=...)) -> (folder, manifest)
    validate(folder, ValidateOptions(...)) -> report;  require_pass(report)
    evaluate(subject, EvalOptions(texts=...)) -> report
    inspect(model, InspectOptions(...)) -> IR text;  run(folder, RunOptions(prompt=...)) -> stats
    catalog() -> what `slmc list` prints;  default_model() -> the built-in model's folder
    diff(a, b, DiffOptions(...)) -> per-block comparison;  write_report(path, ...) -> HTML report
    diff_isolated(a), validate_by_block(folder, ValidateOptions(on=...)) -> every block judged on the
        artifact's own input to it;  require_block_pass(report)
    build(BuildOptions(config="slmc.toml")) -> what `slmc build` did per artifact
The manifest each artifact carries is `slmc.manifest.Manifest` (schema: manifest.schema.json).
The implementation lives in slmc/_api/; this module only names what is public.
"""

from __future__ import annotations

from pathlib import Path

from ._api.build import build
from ._api.compile import compile, compile_ir, compile_passes, quant_summary
from ._api.diff import DiffOptions, diff
from ._api.isolated import diff_isolated, require_block_pass, validate_by_block
from ._api.report import write_report
from ._api.devices import device_setup
from ._api.estimate import EstimateOptions, estimate
from ._api.estimate import devices as estimate_devices
from ._api.estimate import fit_published as estimate_fit, leave_one_out_published as estimate_leave_one_out
from ._api.estimate import published_points as estimate_points
from ._api.estimate import FLOWS as ESTIMATE_FLOWS, FORMS as ESTIMATE_FORMS, PUBLISHED as ESTIMATE_FIGURES
from ._api.jobs import Catalog, catalog, evaluate, evaluate_tokens, inspect, require_pass, run, validate
from ._api.models import (DEFAULT_MODEL, default_model, load, parse_passes, pass_registry, reference_model,
                          resolve_model_path, run_passes, tokenizer_dir)
from ._api.options import BuildOptions, CompileOptions, EvalOptions, InspectOptions, RunOptions, ValidateOptions
from ._api.toolkit import (MLP, ExpertCache, Linear, Model, MoE, QuantWeight, Weight, after_layer, expert_routes,
                           ffn_inputs, kv_bytes_per_token, moe_session, named_weights, param_count, save_ir,
                           serve_layer, tiny_llama_config, token_ids, weight_bytes)
from .manifest import Manifest, read_manifest
from .recipes import recipe_passes

__all__ = [
    "BuildOptions", "build", "CompileOptions", "ValidateOptions", "EvalOptions", "InspectOptions", "RunOptions", "Catalog", "Manifest",
    "compile", "compile_model", "compile_ir", "validate", "validate_artifact", "require_pass", "evaluate",
    "evaluate_tokens", "inspect", "run", "catalog", "default_model", "DEFAULT_MODEL", "load",
    "resolve_model_path", "tokenizer_dir", "reference_model", "read_manifest", "parse_passes", "pass_registry",
    "run_passes", "quant_summary", "diff", "DiffOptions", "write_report", "device_setup",
    "diff_isolated", "validate_by_block", "require_block_pass", "recipe_passes", "compile_passes",
    "EstimateOptions", "estimate", "estimate_devices", "estimate_fit", "estimate_leave_one_out", "estimate_points",
    "ESTIMATE_FLOWS", "ESTIMATE_FORMS", "ESTIMATE_FIGURES",
    # for benchmarks and scripts that build or measure IR themselves
    "Model", "MLP", "Linear", "MoE", "Weight", "QuantWeight", "named_weights", "param_count", "weight_bytes",
    "save_ir", "token_ids", "kv_bytes_per_token", "ffn_inputs", "tiny_llama_config", "expert_routes",
    "moe_session", "ExpertCache", "serve_layer", "after_layer",
]


def compile_model(model: str | Path, target: str = "executorch", backend: str | None = None,
                  out: str | Path = "out", *, progress=None, **options) -> tuple[Path, dict]:
    """compile() with the options as keywords (passes=[...], max_seq_len=..., recipe=...)."""
    for k in ("passes", "calib"):
        if k in options:
            options[k] = tuple(options[k])
    return compile(CompileOptions(model, target, backend, out, **options), progress=progress)


def validate_artifact(folder: str | Path, steps: int = 32, prompt: str | None = None,
                      reference: str | Path | None = None, model: Model | None = None, record: bool = True,
                      on: str | None = None, positions: int = 512, long: bool = False,
                      text: str | Path | None = None):
    """validate() with the options as keywords."""
    return validate(folder, ValidateOptions(steps=steps, prompt=prompt, reference=reference, record=record, on=on,
                                            positions=positions, long=long, text=text), model=model)
