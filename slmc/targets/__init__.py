"""Targets, registered by name: executorch (and more as they land)."""

import importlib

from .base import TARGETS, Artifact, Target, TargetSpec, get_target

_MODULES = ("executorch",)


def load_all() -> None:
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")


__all__ = ["TARGETS", "Artifact", "Target", "TargetSpec", "get_target", "load_all"]
