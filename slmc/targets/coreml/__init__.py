"""Core ML: an `.mlpackage` for swift-transformers (target.py, module.py; the Neural Engine
layout in ane.py), its session (Core ML on macOS, slmc's MIL interpreter elsewhere) and readback."""

from ..registry import register
from .target import CoreMLTarget

register(CoreMLTarget())
