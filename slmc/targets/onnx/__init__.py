"""ONNX Runtime: `model.onnx` + `genai_config.json` for onnxruntime-genai (target.py, export.py,
genai_config.py) and an onnxruntime session (session.py)."""

from ..registry import register
from .target import ONNXTarget

register(ONNXTarget())
