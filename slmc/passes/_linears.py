"""Enumerate the quantizable linears of a model (shared by the quantization passes)."""

from __future__ import annotations

from typing import Iterator

from ..compiler.ir import MLP, Linear, Model, MoE


def _mlp_linears(m: MLP, where: str) -> Iterator[tuple[str, Linear]]:
    for nm in ("gate", "up", "gate_up", "down"):
        if getattr(m, nm) is not None:
            yield f"{where}.{nm}", getattr(m, nm)


def block_linears(model: Model) -> Iterator[tuple[str, Linear]]:
    """(path, Linear) for every projection in every block; routers and gates stay float
    (they are tiny and routing is sensitive to them)."""
    for i, b in enumerate(model.blocks):
        a = b.attn
        for nm in ("q", "k", "v", "qkv", "o"):
            if getattr(a, nm) is not None:
                yield f"blocks.{i}.attn.{nm}", getattr(a, nm)
        if isinstance(b.ffn, MoE):
            for e, ex in enumerate(b.ffn.experts):
                yield from _mlp_linears(ex, f"blocks.{i}.ffn.experts.{e}")
            if b.ffn.shared is not None:
                yield from _mlp_linears(b.ffn.shared, f"blocks.{i}.ffn.shared")
        else:
            yield from _mlp_linears(b.ffn, f"blocks.{i}.ffn")
