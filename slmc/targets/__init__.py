"""Targets, registered by name: executorch, tflite (LiteRT), coreml."""

import importlib

from .base import TARGETS, Artifact, Target, TargetSpec, get_target

_MODULES = ("executorch", "tflite", "coreml")


def load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:  # a target still being written must not break the others
            if e.name != f"{__name__}.{m}":
                raise


__all__ = ["TARGETS", "Artifact", "Target", "TargetSpec", "get_target", "load_all"]
