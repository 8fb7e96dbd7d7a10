"""Targets, one package each (executorch, tflite, coreml, ...), registered by name (registry.py)."""

from .base import Artifact, Session, Target, TargetSpec
from .registry import TARGETS, get_target, load_all, register, target_of

__all__ = ["TARGETS", "Artifact", "Session", "Target", "TargetSpec", "get_target", "load_all", "register",
           "target_of"]
