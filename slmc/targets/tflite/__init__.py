"""LiteRT: a `.tflite` with prefill/decode signatures and a `.litertlm` bundle (target.py),
slmc's own quantized tensors (codes.py), GPU fallback checks (gpu.py), session and readback."""

from ..registry import register
from .target import TFLiteTarget

register(TFLiteTarget())
