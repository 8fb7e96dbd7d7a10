"""The content-addressed artifact cache, safe to share between concurrent builds.

Layout under the cache root (<slmc cache>/build: ~/.cache/slmc/build, or $SLMC_CACHE/build as
for the default model's cache; `slmc build --cache DIR` names it outright):
    objects/<key>/      a complete artifact folder, never modified once there
    locks/<key>.lock    fcntl lock held while <key> is compiled or published
    tmp/<key>.<rand>/   staging: a compile writes here, then one rename publishes it
    hashes.json         file digests memoized by (path, size, mtime, inode)

An object appears only by an atomic rename of a finished folder, so a reader sees all of it
or nothing; a build killed mid-compile leaves only a staging folder, removed by the next build
of that key (which holds the key's lock, so no one else can be writing it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import SlmcError


def default_root() -> Path:
    return Path(os.environ.get("SLMC_CACHE") or Path.home() / ".cache" / "slmc") / "build"


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive fcntl lock on `path` (released by the kernel if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class Cache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_root()
        try:
            for d in ("objects", "locks", "tmp"):
                (self.root / d).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlmcError(f"cannot use the build cache ({e.strerror or e})", str(self.root)) from None

    def object(self, key: str) -> Path:
        return self.root / "objects" / key

    def has(self, key: str) -> bool:
        return (self.object(key) / "manifest.json").is_file()

    def lock(self, key: str):
        return file_lock(self.root / "locks" / f"{key}.lock")

    def staging(self, key: str) -> Path:
        """A fresh staging folder for `key`; stale ones (a killed build's) are removed first.
        Call with the key's lock held."""
        for old in (self.root / "tmp").glob(f"{key}.*"):
            shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.root / "tmp"))

    def publish(self, key: str, folder: Path) -> Path:
        """Move a finished artifact folder into the cache (one rename). Call with the key's lock held."""
        dst = self.object(key)
        if dst.exists():  # published by someone else meanwhile: theirs stays, identical by key
            shutil.rmtree(folder, ignore_errors=True)
        else:
            os.rename(folder, dst)
        return dst

    # --- memoized file digests ------------------------------------------------------------
    def load_memo(self) -> dict:
        try:
            return json.loads((self.root / "hashes.json").read_text())
        except (OSError, ValueError):
            return {}

    def save_memo(self, memo: dict) -> None:
        path = self.root / "hashes.json"
        with file_lock(self.root / "locks" / "hashes.lock"):
            merged = {**self.load_memo(), **memo}
            tmp = path.with_name(f".hashes.{os.getpid()}.json")
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, path)


def copy_into(src: Path, out: Path) -> None:
    """Put a copy of the artifact folder `src` at `out` atomically: copy beside it, then rename
    (the old folder, if any, is swapped out and removed after). Copies, not hard links: an app's
    build may edit its outputs, and that must never reach the shared cache."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(src, tmp / "a")
        os.chmod(tmp / "a", 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rename(out, old / "a")
            os.rename(tmp / "a", out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp / "a", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
