"""One cache miss: compile (and validate) an artifact into the cache under its key's lock.

Runs in the build's process or in a worker process (`--jobs N`); the only module of
slmc/build that imports the compiler (and so torch), and only when something must be built.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .cache import Cache


def compile_into_cache(cache_root: str, key: str, opts: dict, validate: bool) -> dict:
    """Compile `opts` (CompileOptions' fields) unless another build published `key` meanwhile.
    Returns {"status": "compiled" | "hit", "seconds": ...}."""
    cache = Cache(Path(cache_root))
    t0 = time.time()
    with cache.lock(key):
        if cache.has(key):  # a concurrent build compiled it while we waited for the lock
            return {"status": "hit", "seconds": 0.0}
        stage = cache.staging(key)
        try:
            from .._api.compile import compile as compile_
            from .._api.jobs import require_pass, validate as validate_
            from .._api.options import CompileOptions

            folder, _ = compile_(CompileOptions(**{**opts, "out": stage / "a"}))
            if validate:
                require_pass(validate_(folder))
            cache.publish(key, folder)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return {"status": "compiled", "seconds": round(time.time() - t0, 2)}
