"""Small helpers shared by passes: iterate attention and MLP nodes, concatenate and split linears."""

from __future__ import annotations

from typing import Iterator

import torch

from ..compiler.ir import MLP, Attention, Linear, Model, MoE, QuantWeight, Weight


def attentions(model: Model) -> Iterator[Attention]:
    for b in model.blocks:
        yield b.attn


def mlps(model: Model) -> Iterator[MLP]:
    for b in model.blocks:
        if isinstance(b.ffn, MoE):
            yield from b.ffn.experts
            if b.ffn.shared is not None:
                yield b.ffn.shared
        else:
            yield b.ffn


def is_dense(*lins: Linear) -> bool:
    return all(not isinstance(l.weight, QuantWeight) for l in lins)


def concat_linears(lins: list[Linear]) -> Linear:
    """Row-concatenate dense linears; a missing bias becomes zeros if any has one."""
    w = Weight(torch.cat([l.weight.data for l in lins], dim=0))
    if all(l.bias is None for l in lins):
        return Linear(w)
    parts = [l.bias.data if l.bias is not None else torch.zeros(l.out_features, dtype=w.data.dtype)
             for l in lins]
    return Linear(w, Weight(torch.cat(parts)))


def split_linear(lin: Linear, sizes: list[int]) -> list[Linear]:
    ws = lin.weight.data.split(sizes, dim=0)
    bs = lin.bias.data.split(sizes) if lin.bias is not None else [None] * len(sizes)
    return [Linear(Weight(w.clone()), Weight(b.clone()) if b is not None else None) for w, b in zip(ws, bs)]
