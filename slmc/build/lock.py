"""slmc.lock (what each output was built from, and its digest) and the Make/Ninja depfile.

slmc.lock is JSON, sorted, one entry per output ("platform/name"): the cache key, the
artifact's reproducible sha256 (digest.py), the model's sha256, target, backend, recipe.
Commit it: a changed key or sha256 in review says exactly which artifact changed and why.
Both files are written to a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SlmcError

LOCK_VERSION = 1


def read_lock(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
    except ValueError as e:
        raise SlmcError(f"not a valid slmc.lock ({e}); delete it to rebuild", str(path)) from None
    if not isinstance(obj, dict) or obj.get("slmc_lock") != LOCK_VERSION:
        raise SlmcError(f"not an slmc.lock of version {LOCK_VERSION}; delete it to rebuild", str(path))
    return obj


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_lock(path: Path, artifacts: dict) -> None:
    _atomic_write(path, json.dumps({"slmc_lock": LOCK_VERSION, "artifacts": artifacts}, indent=2,
                                   sort_keys=True) + "\n")


def _escape(p: Path) -> str:
    """A path as Make and Ninja read it in a depfile (spaces, #, $ escaped)."""
    return str(p).replace("\\", "\\\\").replace(" ", "\\ ").replace("#", "\\#").replace("$", "$$")


def write_depfile(path: Path, target: Path, deps: list[Path]) -> None:
    """`target: dep dep ...`, one dependency per continued line, absolute paths."""
    lines = [f"{_escape(Path(os.path.abspath(target)))}:"] + [f"  {_escape(Path(os.path.abspath(d)))}" for d in deps]
    _atomic_write(path, " \\\n".join(lines) + "\n")
