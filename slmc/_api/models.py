"""Models in: resolving `default`, loading any supported format, running passes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import passes as _passes  # noqa: F401  importing slmc.passes registers every pass
from ..compiler.importers import load_model
from ..compiler.ir import Model
from ..compiler.pass_manager import PASSES, PassManager, parse_pass
from ..compiler.serialize import is_ir_folder, load_ir
from ..compiler.textdata import find_tokenizer_dir
from ..errors import SlmcError

DEFAULT_MODEL = "default"


def default_model() -> Path:
    """The built-in SmolLM2-135M-Instruct as a Hugging Face folder (fetched and converted once)."""
    from ..default_model import default_model_dir

    return default_model_dir()


def resolve_model_path(path: str, keep_codes: bool = False) -> Path:
    """'default' is the built-in SmolLM2-135M-Instruct (converted once, then cached); with
    keep_codes it is the Q4_1 GGUF that model comes from, whose codes are then kept."""
    if path == DEFAULT_MODEL:
        from ..default_model import default_gguf_path

        return default_gguf_path() if keep_codes else default_model()
    return Path(path)


def load(path: str | Path, max_seq_len: int | None = None, strict: bool = False,
         keep_codes: bool = False) -> Model:
    p = resolve_model_path(str(path), keep_codes)
    if is_ir_folder(p):
        m = load_ir(p)
        if max_seq_len is not None:
            from ..compiler.importers.hf import check_max_seq_len

            check_max_seq_len(max_seq_len, m.max_position, "--max-seq-len")
            m.kv.max_len = max_seq_len
        return m
    return load_model(p, max_seq_len=max_seq_len, strict=strict, keep_codes=keep_codes)


def tokenizer_dir(model_path: Path) -> Path | None:
    return find_tokenizer_dir(model_path)


def pass_registry() -> dict:
    """Every registered pass by name (importing slmc.passes fills the registry)."""
    return PASSES


def parse_passes(specs) -> list:
    """'name[:k=v,...]' strings -> configured passes (unknown names, bad options: exit 2)."""
    return [parse_pass(s) for s in specs]


def run_passes(model: Model, passes, dump_dir: Path | None = None, progress=None) -> tuple[Model, list]:
    """Run passes (specs or configured passes) in order; returns the model and one log per pass
    (name, options, modified, seconds, info)."""
    pipeline = [parse_pass(p) if isinstance(p, str) else p for p in passes]
    return PassManager(pipeline, dump_dir=dump_dir, progress=progress).run(model)


def with_calibration(pipeline: list, calib) -> list:
    """--calib FILE...: every data-aware pass without its own calib= gets these files,
    recorded as absolute paths (the manifest must say what the codes were fitted on)."""
    from ..compiler.textdata import read_text

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


def reference_model(folder: Path, manifest: dict) -> Model:
    """Rebuild the IR an artifact was compiled from: import its source, replay its passes."""
    src = manifest.get("source") or {}
    path = Path(src.get("path", ""))
    if not path.exists():
        raise SlmcError(f"the artifact's source model {path} is gone; pass --reference MODEL", str(folder))
    ir = load(path, max_seq_len=manifest["kv_cache_spec"]["max_len"], keep_codes=bool(src.get("keep_codes")))
    if src.get("sha256") and ir.source.get("sha256") != src["sha256"]:
        raise SlmcError(f"source model {path} changed since compile (sha256 differs)", str(folder))
    registry = pass_registry()
    pipeline = []
    for p in manifest.get("pipeline", []):
        cls = registry.get(p["name"])
        if cls is None:
            raise SlmcError(f"artifact was made with pass {p['name']!r}, unknown to this slmc", str(folder))
        pipeline.append(cls(cls.Options(**p["options"])))
    ir, _ = PassManager(pipeline).run(ir)
    return ir
