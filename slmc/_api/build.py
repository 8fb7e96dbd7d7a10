"""build: slmc.toml in, every platform's artifacts up to date (slmc/build/)."""

from __future__ import annotations

from pathlib import Path

from ..build import build as _build
from .options import BuildOptions


def build(opts: BuildOptions, progress=None) -> dict:
    """Compile and validate what is out of date in `opts.config`; returns one entry per
    artifact ({id, status, key, sha256, out, seconds}) and where slmc.lock and the depfile are."""
    return _build(Path(opts.config), tuple(opts.platforms), opts.jobs, opts.cache, opts.depfile, opts.stamp,
                  opts.out, progress=progress)
