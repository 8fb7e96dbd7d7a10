"""The block-isolated check (runtime_tests/isolated.py): `slmc diff ARTIFACT --isolated` and
`slmc validate OUT --by-block [--on DEVICE]`."""

from __future__ import annotations

import time
from pathlib import Path

from ..compiler.ir import Model
from ..errors import SlmcError
from ..manifest import read_manifest
from .diff import DiffOptions, _artifact_ir, _artifact_side, _is_artifact, _prompt, _same_shape
from .models import load
from .options import ValidateOptions


def diff_isolated(a: str | Path, opts: DiffOptions = DiffOptions(), model_a: Model | None = None,
                  model_b: Model | None = None):
    """Artifact `a`'s debug variant on this host, every block judged in isolation against the
    reference (`model_b`, default the IR the artifact was compiled from, `model_a`, default
    rebuilt from its manifest)."""
    from ..runtime_tests import isolated

    t0 = time.time()
    if not _is_artifact(a):
        raise SlmcError("--isolated compares an artifact folder with its reference", str(a))
    folder = Path(a)
    manifest = read_manifest(folder)
    ir = _artifact_ir(folder, manifest, model_a)
    ref = model_b if model_b is not None else ir
    _same_shape(ir, ref, "reference")
    ids = _prompt(folder, ref, opts.prompt)
    side = _artifact_side(folder, manifest, ir, ids)
    bound, why = isolated.isolated_bound(manifest)
    return isolated.judge(ref, ids, side.states, side.logits, bound, why, str(folder),
                          f"{side.runtime} on this host", side.how, side.artifact_check, t0)


def _end_to_end(manifest: dict) -> dict | None:
    """The last end-to-end validation recorded in the manifest, where it ran and its verdict."""
    v = manifest.get("validation")
    if not v:
        return None
    keep = ("verdict", "flow", "runtime", "reasons", "positions", "mean_kl", "top1_agreement", "delta_ppl",
            "noise_floor", "tolerance")
    return {k: v.get(k) for k in keep if k in v}


def validate_by_block(folder: str | Path, opts: ValidateOptions = ValidateOptions(), model: Model | None = None):
    """The block-isolated verdict of an artifact: its debug variant on this host, or with
    `opts.on` run inside that device (device/by_block.py); the last recorded end-to-end
    verdict is carried beside it (never replaced)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if model is None:
        model = load(opts.reference, max_seq_len=manifest["kv_cache_spec"]["max_len"]) if opts.reference \
            else _artifact_ir(folder, manifest, None)  # diff's cache: rebuilt from the manifest once
    if opts.on:
        from ..device.by_block import by_block_on

        r = by_block_on(folder, manifest, model, _prompt(folder, model, opts.prompt), opts.on)
    else:
        r = diff_isolated(folder, DiffOptions(prompt=opts.prompt), model_a=model)
    r.end_to_end = _end_to_end(manifest)
    return r


def require_block_pass(report) -> None:
    """Raise unless the block-isolated verdict is PASS (exit 1 on FAIL, 3 on INCONCLUSIVE)."""
    from ..errors import ValidationFailed, ValidationInconclusive
    from ..runtime_tests.isolated import reasons

    if report.verdict == "PASS":
        return
    why = "; ".join(reasons(report) + [n for n in report.notes if "does not reproduce" in n])
    if report.verdict == "INCONCLUSIVE":
        raise ValidationInconclusive(f"block-isolated check is inconclusive: {why}", report.artifact)
    raise ValidationFailed(f"block-isolated check failed: {why}", report.artifact)
