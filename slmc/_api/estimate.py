"""`slmc estimate`: resolve the subject (an artifact folder, or a model + target + recipe,
where a folder holding only config.json is enough) into shapes and storage, then run the
roofline of slmc/estimate on a named phone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlmcError
from ..estimate import (DEVICES, FLOWS, FORMS, PUBLISHED, Point, device, estimate as roofline, fit, leave_one_out,
                        quant_of, runtime, shape_of, storage_of, unties)
from ..manifest import FILENAME, read_manifest


@dataclass(frozen=True)
class EstimateOptions:
    device: str  # a key or name of slmc.estimate.DEVICES
    target: str | None = None  # model subjects only (default executorch)
    backend: str | None = None
    recipe: str | None = None
    passes: tuple[str, ...] = ()  # quant.* / kv.cache specs, after the recipe's
    max_seq_len: int | None = None  # default: the artifact's, or what compile would take
    prompt_len: int = 64
    decode_tokens: int = 128
    bare: bool = False  # efficiency 1: the roofline itself


def model_config(path: Path) -> dict:
    """The config of a model (HF folder, .gguf) without reading its weights."""
    from ..compiler.importers.hf import read_config

    if path.is_dir():
        return read_config(path)
    if path.is_file() and path.suffix == ".gguf":
        from ..compiler.importers.gguf import gguf_config, open_reader

        return gguf_config(open_reader(path), path)[0]
    raise SlmcError("expected an artifact folder, a model folder with config.json, or a .gguf file", str(path))


def _artifact(folder: Path, opts: EstimateOptions) -> dict:
    if opts.target or opts.recipe or opts.passes or opts.backend:
        raise SlmcError("--target/--backend/--recipe/--pass describe a model; an artifact folder has its own",
                        str(folder))
    m = read_manifest(folder)
    src = Path((m.get("source") or {}).get("path", ""))
    if not src.exists():
        raise SlmcError(f"the artifact's source model {src} is gone; the estimate reads its config for the shapes",
                        str(folder / FILENAME))
    kv = m.get("kv_cache_spec") or {}
    pipeline = [(p["name"], p.get("options") or {}) for p in m.get("pipeline", [])]
    return {"config": model_config(src), "where": str(src), "target": m["target"], "backend": m["backend"],
            "pipeline": pipeline, "kv_dtype": kv.get("dtype", "float32"), "max_len": kv.get("max_len"),
            "ring": kv.get("window"), "subject": str(folder)}


def _model(path: str, opts: EstimateOptions) -> dict:
    from ..compiler.pass_manager import parse_pass
    from ..recipes import recipe_passes
    from .compile import _target_and_spec
    from .models import DEFAULT_MODEL, pass_registry, resolve_model_path

    p = resolve_model_path(path) if path == DEFAULT_MODEL else Path(path)
    if not p.exists():
        raise SlmcError("no such file or folder", str(p))
    target = opts.target or "executorch"
    _, spec = _target_and_spec(target, opts.backend)
    specs = (recipe_passes(opts.recipe, target, spec.backend_name) if opts.recipe else []) + list(opts.passes)
    pass_registry()  # registers the passes so their options are parsed and checked
    pipeline = [(q.name, dataclasses.asdict(q.options)) for q in map(parse_pass, specs)]
    kv = next((o for n, o in reversed(pipeline) if n == "kv.cache"), {})
    where = str(p / "config.json") if p.is_dir() else str(p)
    return {"config": model_config(p), "where": where, "target": target, "backend": spec.backend_name,
            "pipeline": pipeline, "kv_dtype": kv.get("dtype") or "float32", "max_len": None,
            "ring": kv.get("window") or None, "subject": str(path)}


def estimate(subject: str | Path, opts: EstimateOptions) -> dict:
    """The roofline estimate of `subject` on `opts.device` (see slmc.estimate)."""
    dev = device(opts.device)
    folder = Path(subject)
    s = _artifact(folder, opts) if (folder / FILENAME).is_file() else _model(str(subject), opts)
    shape = shape_of(s["config"], s["where"])
    st = storage_of(s["target"], quant_of(s["pipeline"], s["subject"]), s["kv_dtype"],
                    tied=shape.tied and not unties(s["pipeline"]))
    rt = runtime(s["target"], s["backend"], opts.bare)
    max_len = opts.max_seq_len or s["max_len"] or min(shape.max_position, 2048)
    if not 1 < max_len <= shape.max_position:
        raise SlmcError(f"max_seq_len {max_len} is outside 2..{shape.max_position}, the model's position limit",
                        "--max-seq-len")
    if not 0 < opts.prompt_len < max_len:
        raise SlmcError(f"prompt length {opts.prompt_len} must be in 1..{max_len - 1}", "--prompt-len")
    out = roofline(shape, st, dev, rt, max_len, opts.prompt_len, opts.decode_tokens, s["ring"])
    return {"subject": s["subject"], "target": s["target"], "backend": s["backend"], **out}


def devices() -> list[str]:
    """The keys `--device` takes."""
    return list(DEVICES)


def published_points(configs: str | Path, figures=PUBLISHED) -> list[Point]:
    """Each published figure as the fit sees it: the terms of its time per token, from the
    model's public config in `configs`/<model>/ (no weights) and the phone's table entry."""
    out = []
    for f in figures:
        target, backend, passes, _ = FLOWS[f.flow]
        e = estimate(Path(configs) / f.model, EstimateOptions(f.device, target=target, backend=backend,
                                                             passes=passes, prompt_len=f.prompt, bare=True))
        out.append(Point(f.key, f.runtime, f.metric, e[f.metric]["terms"], 1 / f.tok_s))
    return out


def fit_published(configs: str | Path, figures=PUBLISHED) -> dict:
    """Per runtime: form A's decode parameters and the prefill parameter fitted on ALL its
    figures (what runtimes.py carries), with the figures each came from."""
    pts = published_points(configs, figures)
    out: dict[str, dict] = {}
    for rt in dict.fromkeys(p.runtime for p in pts):
        dec = [p for p in pts if p.runtime == rt and p.metric == "decode"]
        pre = [p for p in pts if p.runtime == rt and p.metric == "prefill"]
        inv_bw, cycles = fit(dec, "A") if dec else (0.0, None)
        (inv_c,) = fit(pre, "prefill") if pre else (0.0,)
        out[rt] = {"eff_bw": 1 / inv_bw if inv_bw else None, "overhead_cycles": cycles,
                   "eff_compute": 1 / inv_c if inv_c else None,
                   "decode_figures": [p.key for p in dec], "prefill_figures": [p.key for p in pre]}
    return out


def leave_one_out_published(configs: str | Path, form: str, figures=PUBLISHED) -> list[dict]:
    """Each published figure of the form's metric predicted from the runtime's other figures."""
    return leave_one_out(published_points(configs, figures), form)
