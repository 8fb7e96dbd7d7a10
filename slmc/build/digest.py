"""Digests: of a model's files (the cache key's input) and of an artifact (what slmc.lock pins).

An artifact's digest covers every file byte for byte except manifest.json, of which only the
fields that do not vary between identical compiles count: timings (compile_seconds, each pass's
seconds), host paths (source.path, calibration file paths) and the last validation report are
kept apart (they stay in manifest.json, for people, but are not part of what is reproducible).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"


def file_sha256(path: Path, memo: dict | None = None) -> str:
    """sha256 of a file; `memo` maps (path, size, mtime_ns, inode) to a digest already taken,
    so an unchanged 300 MB model is not read again on every no-op build."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if memo is not None and key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if memo is not None:
        memo[key] = h.hexdigest()
    return h.hexdigest()


def tree_files(root: Path) -> list[Path]:
    """Regular files under `root` (hidden files and folders skipped), sorted by relative path."""
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(dirpath) / f for f in files if not f.startswith(".")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def tree_sha256(root: Path, memo: dict | None = None, skip: tuple[str, ...] = ()) -> str:
    """One digest over (relative path, sha256) of every file: names count, order does not."""
    h = hashlib.sha256()
    for p in tree_files(root):
        rel = p.name if root.is_file() else p.relative_to(root).as_posix()
        if rel in skip:
            continue
        h.update(f"{rel}\0{file_sha256(p, memo)}\n".encode())
    return h.hexdigest()


def stable_manifest(obj: dict) -> dict:
    """The manifest without the fields that differ between identical compiles."""
    m = copy.deepcopy(obj)
    for k in ("compile_seconds", "validation"):
        m.pop(k, None)
    for p in m.get("pipeline", []):
        p.pop("seconds", None)
    if isinstance(m.get("source"), dict):
        m["source"].pop("path", None)
    for c in m.get("calibration_files", []):
        if isinstance(c, dict):
            c.pop("path", None)
    return m


def artifact_sha256(folder: Path, memo: dict | None = None) -> str:
    """The artifact's reproducible digest: its files, and the stable part of its manifest."""
    folder = Path(folder)
    h = hashlib.sha256(tree_sha256(folder, memo, skip=(MANIFEST,)).encode())
    man = folder / MANIFEST
    if man.is_file():
        h.update(json.dumps(stable_manifest(json.loads(man.read_text())), sort_keys=True).encode())
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 per file (manifest.json as its stable part): what a reproducibility check compares."""
    folder = Path(folder)
    out = {}
    for p in tree_files(folder):
        rel = p.relative_to(folder).as_posix()
        if rel == MANIFEST:
            text = json.dumps(stable_manifest(json.loads(p.read_text())), sort_keys=True)
            out[rel + " (stable fields)"] = hashlib.sha256(text.encode()).hexdigest()
        else:
            out[rel] = file_sha256(p)
    return out


def slmc_source_sha256() -> str:
    """slmc's own code (every .py and .json in the package): a changed compiler is a new key even
    when the version string is not bumped (an editable install, a local fix)."""
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(pkg.rglob("*")):
        if p.suffix in (".py", ".json") and p.is_file() and "__pycache__" not in p.parts:
            h.update(p.relative_to(pkg).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
