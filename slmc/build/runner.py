"""`slmc build`: bring every artifact of slmc.toml up to date, through the shared cache.

Per artifact: key = sha256 of (model files, declared pipeline, target/backend, versions).
Up to date (slmc.lock has this key and the output's digest): nothing. Cached: copy the
object. Else compile + validate into the cache (worker.py), then copy. Finally slmc.lock
(key and sha256 per output) and a Make/Ninja depfile are written.
Nothing here imports torch unless something must be compiled.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as host
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

from .. import __version__
from ..errors import SlmcError
from . import config as cfgmod
from .cache import Cache, copy_into, file_lock
from .digest import artifact_sha256, slmc_source_sha256, tree_files, tree_sha256
from .lock import read_lock, write_depfile, write_lock
from .worker import compile_into_cache

RUNTIMES = ("torch", "executorch", "coremltools", "ai-edge-litert", "litert-lm-builder", "onnx", "onnxscript",
            "onnxruntime", "transformers", "torchao")


@dataclass
class Job:
    platform: str
    name: str
    where: str  # the artifact's key in slmc.toml, for errors
    out: Path
    key: str
    key_inputs: dict
    compile_opts: dict
    validate: bool
    deps: list  # input files (model, calibration texts) for the depfile
    status: str = ""
    seconds: float = 0.0
    sha256: str = ""

    @property
    def id(self) -> str:
        return f"{self.platform}/{self.name}"


def versions() -> dict:
    out = {"slmc": __version__, "slmc_source": slmc_source_sha256(), "python": host.python_version()}
    for pkg in RUNTIMES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _model_path(cfg, name: str) -> Path:
    spec = cfg.models[name]
    if spec.path == "default":
        from ..default_model import default_model_dir

        return default_model_dir()
    p = cfg.resolve(spec.path)
    if not p.exists():
        raise SlmcError(f"no such model file or folder: {p}", f"{cfg.path.name}: models.{name}.path")
    return p


def plan(cfg, platforms: list[str], memo: dict, out: Path | None = None) -> list[Job]:
    vers, models, jobs = versions(), {}, []
    for pname in platforms:
        pspec = cfg.platforms[pname]
        for i, a in enumerate(pspec.artifacts):
            where = f"{cfg.path.name}: platforms.{pname}.artifacts[{i}]"
            if a.model not in models:
                path = _model_path(cfg, a.model)
                digest = tree_sha256(path, memo)
                pin = cfg.models[a.model].sha256
                if pin and pin != digest:
                    raise SlmcError(f"the model's files have sha256 {digest}, not the pinned {pin}",
                                    f"{cfg.path.name}: models.{a.model}.sha256")
                models[a.model] = (path, digest)
            path, digest = models[a.model]
            calib = []
            for c in a.calib:
                cp = cfg.resolve(c)
                if not cp.is_file():
                    raise SlmcError(f"no such calibration file: {cp}", f"{where}.calib")
                calib.append(cp)
            from ..recipes import RECIPES

            passes = list(a.passes) + ([a.kv.pass_spec()] if a.kv.pass_spec() else [])
            key_inputs = {
                "model": {"sha256": digest, "name": path.name},  # Core ML's metadata names the model
                "target": a.target, "backend": a.backend,
                "pipeline": {"recipe": a.recipe, "recipe_passes": list(RECIPES[a.recipe].passes) if a.recipe else [],
                             "passes": passes, "max_seq_len": a.max_seq_len,
                             "calib": [tree_sha256(c, memo) for c in calib]},
                "validate": a.validate, "versions": vers}
            key = hashlib.sha256(json.dumps(key_inputs, sort_keys=True).encode()).hexdigest()
            opts = {"model": str(path) if cfg.models[a.model].path != "default" else "default",
                    "target": a.target, "backend": a.backend, "passes": tuple(passes), "recipe": a.recipe,
                    "calib": tuple(str(c) for c in calib), "max_seq_len": a.max_seq_len}
            jobs.append(Job(pname, a.name, where, (out or cfg.resolve(pspec.out)) / a.name, key, key_inputs, opts,
                            a.validate, tree_files(path) + calib))
    return jobs


def _sweep_outputs(jobs: list[Job]) -> None:
    """Staging folders a killed build left beside the outputs (hidden, never an artifact)."""
    for j in jobs:
        if j.out.parent.is_dir():
            for old in j.out.parent.glob(f".{j.out.name}.*"):
                shutil.rmtree(old, ignore_errors=True)


def _compile_misses(cache: Cache, misses: list[Job], n: int, progress) -> None:
    def done(j, r):
        j.status = "compiled" if r["status"] == "compiled" else "waited for another build"
        j.seconds = r["seconds"]
        progress(f"{j.id}: {j.status} ({j.seconds} s)")

    def fail(j, e):
        if isinstance(e, SlmcError):
            raise type(e)(str(e), j.where) from None
        raise e

    if n <= 1 or len(misses) <= 1:
        for j in misses:
            progress(f"{j.id}: compiling ({j.compile_opts['target']})")
            try:
                done(j, compile_into_cache(str(cache.root), j.key, j.compile_opts, j.validate))
            except Exception as e:
                fail(j, e)
        return
    with ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn")) as ex:
        futs = {j.id: ex.submit(compile_into_cache, str(cache.root), j.key, j.compile_opts, j.validate)
                for j in misses}
        for j in misses:
            progress(f"{j.id}: compiling ({j.compile_opts['target']})")
        for j in misses:
            try:
                done(j, futs[j.id].result())
            except Exception as e:
                fail(j, e)


def build(config: str | Path = "slmc.toml", platforms: tuple[str, ...] = (), jobs: int = 1,
          cache_dir: str | Path | None = None, depfile: str | Path | None = None,
          stamp: str | Path | None = None, out: str | Path | None = None, progress=None) -> dict:
    """Bring the artifacts of `config` (for `platforms`, default all) up to date. Returns
    {"artifacts": [{id, status, key, sha256, out, seconds}], "lock": path, "depfile": path}.
    `out` replaces the platform's out folder (an app build's own asset folder; one platform only)."""
    step = progress or (lambda msg: None)
    cfg = cfgmod.load(config)
    for p in platforms:
        if p not in cfg.platforms:
            raise SlmcError(f"{p!r} is not a platform of {cfg.path.name} ({', '.join(cfg.platforms)})", "--platform")
    if jobs < 1:
        raise SlmcError(f"must be at least 1, not {jobs}", "--jobs")
    chosen = list(platforms) or list(cfg.platforms)
    if out is not None and len(chosen) != 1:
        raise SlmcError("needs exactly one --platform (each platform has its own out folder)", "--out")
    cache = Cache(Path(cache_dir) if cache_dir else None)
    lock_path = cfg.root / "slmc.lock"
    t0 = time.time()
    with file_lock(cfg.root / ".slmc-build.lock"):  # one build of this project at a time
        memo = cache.load_memo()
        todo = plan(cfg, chosen, memo, Path(os.path.abspath(out)) if out is not None else None)
        _sweep_outputs(todo)
        locked = read_lock(lock_path).get("artifacts", {})
        for j in todo:
            prev = locked.get(j.id, {})
            if prev.get("key") == j.key and j.out.is_dir() and artifact_sha256(j.out, memo) == prev.get("sha256"):
                j.status, j.sha256 = "up to date", prev["sha256"]
        misses = [j for j in todo if not j.status and not cache.has(j.key)]
        _compile_misses(cache, misses, jobs, step)
        for j in todo:
            if j.status == "up to date":
                continue
            j.status = j.status or "cache hit"
            copy_into(cache.object(j.key), j.out)
            j.sha256 = artifact_sha256(j.out, memo)
            step(f"{j.id}: {j.status} -> {j.out}")
        entries = {j.id: {"key": j.key, "sha256": j.sha256, "out": os.path.relpath(j.out, cfg.root),
                          "model_sha256": j.key_inputs["model"]["sha256"], "target": j.compile_opts["target"],
                          "backend": j.compile_opts["backend"], "recipe": j.compile_opts["recipe"]}
                   for j in todo}
        write_lock(lock_path, {**locked, **entries})
        deps = [cfg.path] + sorted({d for j in todo for d in j.deps})
        dep_path = Path(depfile) if depfile else cfg.root / "slmc.d"
        target = Path(stamp) if stamp else lock_path
        write_depfile(dep_path, target, deps)
        if stamp:
            Path(stamp).parent.mkdir(parents=True, exist_ok=True)
            Path(stamp).touch()
        cache.save_memo(memo)
    return {"artifacts": [{"id": j.id, "status": j.status, "key": j.key, "sha256": j.sha256, "out": str(j.out),
                           "seconds": j.seconds} for j in todo],
            "lock": str(lock_path), "depfile": str(dep_path), "seconds": round(time.time() - t0, 2),
            "cache": str(cache.root)}


def describe_config(config: str | Path) -> dict:
    """The validated config as plain data (for tools and the docs' schema check)."""
    cfg = cfgmod.load(config)
    return {"models": {k: asdict(v) for k, v in cfg.models.items()},
            "platforms": {k: asdict(v) for k, v in cfg.platforms.items()}}
