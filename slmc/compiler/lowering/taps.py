"""Hidden-state taps: a debug variant of the lowered decoder that also returns its residual stream.

`slmc diff` needs each runtime's view of the hidden state after every block. A compiled
artifact exposes only logits, so each target compiles a *debug variant*: the same LoweredLM
(same components, same weights, same converter) wrapped in `Tapped`, whose forward returns
the wrapped outputs plus one more tensor, `hidden_states` [depths + 2, T, hidden] float32:
the embedding output, the residual stream after every depth (in depth order, shared blocks
once per call), and the final norm's output. The taps are forward hooks, so the decoder's
own forward is untouched; torch.export traces them like any other op.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .module import LoweredLM


class Taps:
    """Forward hooks on a LoweredLM collecting [T, hidden] rows per stage during one call."""

    def __init__(self, lm: LoweredLM):
        self.lm, self.values = lm, []
        first = lm.blocks[lm.layers[0]]
        first.register_forward_pre_hook(self._before_first)
        for b in sorted(set(lm.layers)):
            lm.blocks[b].register_forward_hook(self._after_block)
        lm.final_norm.register_forward_hook(self._after_norm)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm.channels_first:  # [1, C, 1, T] -> [T, C]
            return x[0, :, 0, :].transpose(0, 1)
        return x.reshape(-1, x.shape[-1])

    def _before_first(self, mod, args):
        if not self.values:  # the embedding output, once per call
            self.values.append(self._rows(args[0]))

    def _after_block(self, mod, args, out):
        self.values.append(self._rows(out[0]))

    def _after_norm(self, mod, args, out):
        self.values.append(self._rows(out))

    def stacked(self) -> torch.Tensor:
        vals, self.values = self.values, []
        return torch.stack([v.float() for v in vals])


class Tapped(nn.Module):
    """inner(*args) with `hidden_states` appended: to a tuple, as a key of a dict (LiteRT
    signatures), or after a single tensor. `lm` is the LoweredLM inside `inner`."""

    def __init__(self, inner: nn.Module, lm: LoweredLM):
        super().__init__()
        self.inner, self.taps = inner, Taps(lm)

    def forward(self, *args, **kwargs):
        self.taps.values = []
        out = self.inner(*args, **kwargs)
        hidden = self.taps.stacked()
        if isinstance(out, dict):
            return {**out, "hidden_states": hidden}
        return (*out, hidden) if isinstance(out, tuple) else (out, hidden)
