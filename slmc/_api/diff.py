"""diff: layer-by-layer comparison of an artifact with its reference, of two artifacts, or of a
model's float IR with its quantized IR (runtime_tests/diff.py)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from ..compiler.ir import Model
from ..errors import SlmcError
from ..manifest import read_manifest
from .models import load, reference_model, resolve_model_path, run_passes, tokenizer_dir


@dataclass(frozen=True)
class DiffOptions:
    prompt: str | None = None  # default: validate's fixed sentence (tiny models: fixed ids)
    # the float-vs-quantized mode (A is a model): the passes, or a recipe's passes, to quantize with
    passes: tuple[str, ...] = ()
    recipe: str | None = None
    max_seq_len: int | None = None


# One process often diffs one artifact several times (a .pte vs its reference, then vs a .tflite):
# its rebuilt IR and its debug variant's states are kept for the same folder, manifest and prompt.
_IRS: dict = {}
_SIDES: dict = {}


def _key(folder: Path) -> tuple:
    return str(folder.resolve()), (folder / "manifest.json").stat().st_mtime_ns


def _artifact_ir(folder: Path, manifest: dict, model: Model | None) -> Model:
    if model is not None:
        return model
    k = _key(folder)
    if k not in _IRS:
        if len(_IRS) >= 2:  # a real model's IR is large: the two sides' at most
            _IRS.pop(next(iter(_IRS)))
        _IRS[k] = reference_model(folder, manifest)
    return _IRS[k]


def _artifact_side(folder: Path, manifest: dict, model: Model, ids: list[int]):
    from ..runtime_tests import diff as d

    k = (*_key(folder), tuple(ids), id(model))
    if k not in _SIDES:
        if len(_SIDES) >= 4:
            _SIDES.pop(next(iter(_SIDES)))
        _SIDES[k] = (model, d.artifact_side(folder, manifest, model, ids))  # the model kept: its id stays its own
    return _SIDES[k][1]


def _is_artifact(p) -> bool:
    return p is not None and (Path(p) / "manifest.json").is_file()


def _prompt(folder: Path | None, model: Model, prompt: str | None) -> list[int]:
    from ..runtime_tests.validate import prompt_ids

    ids, _ = prompt_ids(folder if folder is not None else Path("/nonexistent"), model, prompt)
    if not ids:
        raise SlmcError("the prompt has no tokens", "--prompt")
    return ids[: model.kv.max_len - 1]


def _same_shape(a: Model, b: Model, where: str) -> None:
    sa, sb = (a.n_layers, a.hidden_size, a.vocab_size), (b.n_layers, b.hidden_size, b.vocab_size)
    if sa != sb:
        raise SlmcError(f"the two sides are different models (layers, hidden, vocab: {sa} vs {sb})", where)


def diff(a: str | Path, b: str | Path | None = None, opts: DiffOptions = DiffOptions(),
         model_a: Model | None = None, model_b: Model | None = None):
    """Compare per block (embedding, every block's residual stream, final norm, logits).
    a artifact, b None or "reference": the artifact vs the IR it was compiled from;
    a artifact, b artifact: the two artifacts (b is the baseline);
    a artifact, b a model: the artifact vs that model's IR (fp32 unless passes are given);
    a model: its float IR vs the IR after `opts.passes` / `opts.recipe` (where quantization enters).
    model_a / model_b: the IR an artifact was compiled from (default: rebuilt from its manifest);
    model_b with b None: the reference IR to compare with (default: model_a)."""
    from ..runtime_tests import diff as d

    t0 = time.time()
    if _is_artifact(a):
        fa = Path(a)
        ma = read_manifest(fa)
        ir_a = _artifact_ir(fa, ma, model_a)
        ids = _prompt(fa, ir_a, opts.prompt)
        names = d.stage_names(ir_a)
        side_a = _artifact_side(fa, ma, ir_a, ids)
        if b is None or str(b) == "reference":
            ref, label = (ir_a, "reference (the artifact's IR)") if model_b is None else (model_b, "reference")
            _same_shape(ir_a, ref, "reference")
            base = d.reference_side(ref, ids, label)
            return d.diff_sides(side_a, base, names, "artifact-vs-reference", t0, floor=d.noise_floor(ref, ids, base))
        if _is_artifact(b):
            fb = Path(b)
            mb = read_manifest(fb)
            ir_b = _artifact_ir(fb, mb, model_b)
            _same_shape(ir_a, ir_b, str(b))
            return d.diff_sides(side_a, _artifact_side(fb, mb, ir_b, ids), names, "artifact-vs-artifact", t0)
        ir_b = model_b if model_b is not None else load(resolve_model_path(str(b)), max_seq_len=ir_a.kv.max_len)
        if opts.passes or opts.recipe:
            ir_b, _ = run_passes(copy.deepcopy(ir_b), _passes(opts))
        _same_shape(ir_a, ir_b, str(b))
        base = d.reference_side(ir_b, ids, f"reference ({b})")
        return d.diff_sides(side_a, base, names, "artifact-vs-reference", t0, floor=d.noise_floor(ir_b, ids, base))
    if b is not None:
        raise SlmcError("the first argument must be an artifact folder when a second is given "
                        "(a model alone compares its float and quantized IR)", str(a))
    if not (opts.passes or opts.recipe):
        raise SlmcError("comparing a model's float and quantized IR needs --pass or --recipe", str(a))
    src = resolve_model_path(str(a))
    fp = model_a if model_a is not None else load(src, max_seq_len=opts.max_seq_len)
    q, _ = run_passes(copy.deepcopy(fp), _passes(opts))
    ids = _prompt(tokenizer_dir(src), fp, opts.prompt)
    bound, why = d.scheme_bound(q)
    r = d.diff_sides(d.reference_side(q, ids, "quantized IR"), d.reference_side(fp, ids, "float IR"),
                        d.stage_names(fp), "float-vs-quantized", t0, bound, why, judged=False)
    r.passes = _passes(opts)
    return r


def _passes(opts: DiffOptions) -> list[str]:
    out = []
    if opts.recipe:
        from ..recipes import RECIPES

        if opts.recipe not in RECIPES:
            raise SlmcError(f"unknown recipe {opts.recipe!r}; recipes: {', '.join(RECIPES)}", "--recipe")
        out += list(RECIPES[opts.recipe].passes)
    return out + list(opts.passes)
