"""The ring-buffer KV cache (KVCacheSpec.window W, sink_tokens S) in plain ops.

Slots 0..S-1 hold positions 0..S-1 for good (attention sinks); the other R = W - S slots
hold the latest positions, position p in slot S + (p - S) mod R. A query at position q
attends to the sinks and to the last R positions (math.ring_visible).

A chunk of T <= R new tokens attends to [the W slots as they were | its own T rows],
then its rows are written: writing first would overwrite rows that the chunk's earlier
queries still need once the ring has wrapped. Which position each slot holds follows
from the chunk's start alone, so no bookkeeping lives outside the cache.
"""

from __future__ import annotations

import torch

from .math import ring_visible


def ring_slots(positions: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """The slot of each position."""
    return torch.where(positions < sinks, positions,
                       sinks + torch.remainder(positions - sinks, window - sinks))


def ring_masks(positions: torch.Tensor, window: int, sinks: int, windows: list, dtype) -> list[torch.Tensor]:
    """One additive mask [T, W + T] per distinct model sliding window (None: none)."""
    R = window - sinks
    start = positions[:1]
    j = torch.arange(window, dtype=positions.dtype)
    # the latest position before `start` that lands in ring slot j (p = j mod R); the offset
    # keeps remainder's argument >= 0, where floor and truncating remainders agree (ExecuTorch's
    # portable kernel truncates)
    latest = start - 1 - torch.remainder(start - 1 - j + R * ((window + R) // R), R)
    held = torch.where(j < sinks, j, latest)
    valid = torch.where(j < sinks, j < start, latest >= sinks)
    q = positions[:, None]
    old = valid[None, :] & ring_visible(q, held[None, :], window, sinks)
    new = (positions[None, :] <= q) & ring_visible(q, positions[None, :], window, sinks)
    masks = []
    for w in windows:
        o, n = old, new
        if w is not None:  # the model's own sliding window, on top of the ring
            o, n = o & (q - held[None, :] < w), n & (q - positions[None, :] < w)
        masks.append(torch.where(torch.cat([o, n], 1), 0.0, float("-inf")).to(dtype))
    return masks
