"""ExecuTorch: a `.pte` for the stock LLM runner (target.py), its backends (backends.py),
expert offload (moe.py, moe_runner.py), runtime session and readback."""

from ..registry import register
from .target import ExecuTorchTarget

register(ExecuTorchTarget())
