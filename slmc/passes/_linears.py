"""The linears of a model, for the passes (the walk itself lives in the IR, so targets share it)."""

from ..compiler.ir import block_linears

__all__ = ["block_linears"]
