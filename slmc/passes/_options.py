"""Option vocabularies shared by several passes.

A pass's Options inherits the vocabularies it speaks, so the same knob has the same name,
default and meaning everywhere (`--pass quant.gptq:bits=4,group_size=32,calib=a.txt`).
The fields stay flat: manifests record `dataclasses.asdict(options)` and replay rebuilds
`Options(**that)`. A pass may override a default by redeclaring the field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..compiler.calib import calibration_ids, describe, split_files


@dataclass(frozen=True)
class QuantOptions:
    """Groupwise weight quantization (quant.rtn, quant.gptq, quant.awq)."""

    bits: int = 4
    group_size: int = 32  # 0: one group per output row (per channel)
    symmetric: bool = True
    embed_bits: int = 0  # 0: keep the embedding table in float
    head_bits: int = 0  # 0: keep the output head in float
    # the embedding's and head's groups: -1 the same as group_size, 0 one group per row (XNNPACK
    # holds 8-bit weights per channel only, so an int8 head next to int4 g32 linears needs 0)
    ends_group_size: int = -1
    scale_dtype: str = "float32"  # bfloat16: scales exact in XNNPACK's bf16 storage
    act_bits: int = 0  # 8: int8 dynamic per-token activations at run time (XNNPACK 8da4w)


@dataclass(frozen=True)
class CalibOptions:
    """Calibration tokens for data-aware passes (see compiler/calib.py)."""

    calib: str = ""  # your text files, separated by ';' (empty: data-free)
    n_seqs: int = 16
    seq_len: int = 256
    seed: int = 0
    temperature: float = 1.0  # data-free sampling only
    first: str = "random"  # data-free: each sample starts at a random vocabulary token, or at "bos"

    def tokens(self, ir) -> tuple[torch.Tensor, float]:
        """The calibration token ids for `ir` ([n_seqs, seq_len]) and the seconds they took
        (reading your text, or sampling data-free sequences from the model)."""
        t0 = time.perf_counter()
        ids = calibration_ids(ir, split_files(self.calib), self.n_seqs, self.seq_len, self.seed,
                              self.temperature, self.first)
        return ids, time.perf_counter() - t0

    def describe(self) -> str:
        """Where the calibration tokens come from, for the pass's info in the manifest."""
        return describe(split_files(self.calib), self.n_seqs, self.seq_len, self.seed, self.temperature,
                        self.first)


@dataclass(frozen=True)
class ProjectionOptions:
    """Which projection groups a fuse/split pass touches."""

    qkv: bool = True
    gate_up: bool = True
