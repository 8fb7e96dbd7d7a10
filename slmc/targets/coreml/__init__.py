"""Core ML: an `.mlpackage` for swift-transformers (target.py; the decoder's components,
Neural Engine layout included, in module.py), its session (Core ML on macOS, slmc's MIL interpreter elsewhere) and readback."""

from ..registry import register
from .target import CoreMLTarget

register(CoreMLTarget())
