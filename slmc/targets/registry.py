"""The registry of targets. Each package under slmc/targets/ registers its Target once, in its
`__init__`; `load_all` imports every such package, so nothing else lists the targets."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ..errors import SlmcError
from .base import Target

TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def load_all() -> None:
    pkg = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.ispkg:  # a target is a package; the modules beside them are shared machinery
            importlib.import_module(f"{__package__}.{info.name}")


def get_target(name: str) -> Target:
    load_all()
    if name not in TARGETS:
        raise SlmcError(f"unknown target {name!r}; available: {', '.join(sorted(TARGETS))}", "--target")
    return TARGETS[name]


def target_of(manifest: dict, where: str | Path = "manifest.json") -> Target:
    """The target that wrote this artifact: by the manifest's target, else by its format."""
    load_all()
    if manifest.get("target") in TARGETS:
        return TARGETS[manifest["target"]]
    fmt = manifest.get("format")
    for t in TARGETS.values():
        if fmt in t.formats:
            return t
    raise SlmcError(f"no target writes artifact format {fmt!r}", str(where))
