"""Steps shared by the weight-quantization passes (quant.rtn, quant.gptq, quant.awq)."""

from __future__ import annotations

import torch

from ..compiler import reference
from ..compiler.ir import Linear, Model, QuantWeight, block_linears, read_through
from ..compiler.pass_manager import Pass
from ..compiler.quant import QuantScheme, rtn
from ..compiler.spill import Spill, page_out_weights
from ..errors import SlmcError
from ._options import QuantOptions


def ends_scheme(opts: QuantOptions, bits: int) -> QuantScheme:
    """The embedding's or head's scheme: their own group size (ends_group_size; -1 the linears')."""
    g = opts.group_size if opts.ends_group_size < 0 else opts.ends_group_size
    return QuantScheme(bits, g, opts.symmetric, opts.scale_dtype)


def head_scheme(ir: Model, opts: QuantOptions) -> QuantScheme:
    s = ends_scheme(opts, opts.head_bits)
    s.check(ir.lm_head.in_features, "--pass quant:head_bits")
    return s


def embedded(ir: Model, ids: torch.Tensor) -> torch.Tensor:
    """The calibration tokens' embeddings, with none of the table left resident: its rows are
    read through (a float table is not kept), then its mapped pages let go. A lookup of a few
    thousand scattered rows maps nearly the whole table, since the kernel maps the cached pages
    around each fault too (Llama-3.2-1B: 250 MiB of int4 codes in one code per byte, 0.5 GB of
    bf16, held through the first block)."""
    with read_through():
        x = reference.embed(ir, ids)
    page_out_weights()
    return x


def quantize_ends(ir: Model, opts: QuantOptions, algorithm: str, head: bool = True, spill: Spill | None = None) -> int:
    """Embedding and head at their own bit widths (a tied head gets its own node first, holding
    the float table). head=False leaves the head float for the caller to quantize (GPTQ does,
    on the final norm's output, after the blocks). spill: each table's codes go there as made."""
    n = 0
    if opts.head_bits:
        if ir.lm_head is None:
            ir.lm_head = Linear(ir.embed)
        if head and not isinstance(ir.lm_head.weight, QuantWeight):
            old = ir.lm_head.weight
            ir.lm_head.weight = rtn(old, head_scheme(ir, opts), algorithm)  # read a chunk at a time
            n += spilled(ir.lm_head.weight, spill)
            if ir.embed is not old:  # a tied table is read once more, for the embedding, below
                old.release()
    if opts.embed_bits and not isinstance(ir.embed, QuantWeight):
        s = ends_scheme(opts, opts.embed_bits)
        s.check(ir.hidden_size, "--pass quant:embed_bits")
        old = ir.embed
        ir.embed = rtn(old, s, algorithm)  # a chunk of rows at a time: no whole table in memory
        n += spilled(ir.embed, spill)
        # a float head still holding this table (GPTQ quantizes it after the blocks) reads it again
        # then: a 128k-row bf16 table is 0.5 GB, otherwise resident through every block
        old.release()
    return n


def spilled(q: QuantWeight, spill: Spill | None) -> int:
    """1, after moving q's tables to `spill` (if any) and letting the float table's pages go."""
    if spill is not None:
        spill.quant(q)
        page_out_weights()
    return 1


def set_act_bits(ir: Model, opts: QuantOptions, where: str) -> None:
    """Record run-time activation quantization on every quantized block linear and head."""
    if opts.act_bits not in (0, 8):
        raise SlmcError(f"act_bits={opts.act_bits}: 0 (float activations) or 8 (int8 per token)", where)
    if not opts.act_bits:
        return
    lins = [lin for _, lin in block_linears(ir)] + ([ir.lm_head] if ir.lm_head is not None else [])
    for lin in lins:
        if isinstance(lin.weight, QuantWeight):
            lin.weight.act_bits = opts.act_bits


def quant_ensures(opts: QuantOptions) -> tuple[str, ...]:
    """What a quantization pass with these options promises about the IR after it."""
    return (("quantized_linears",) + (("quantized_head",) if opts.head_bits else ())
            + (("quantized_embed",) if opts.embed_bits else ()))


class QuantPass(Pass):
    """What RTN, GPTQ and AWQ share: the block linears' scheme from QuantOptions, its group
    size checked on every float linear (and the ends' on the hidden size) before any
    (minutes-long) calibration, and the
    properties the options promise."""

    @property
    def ensures(self) -> tuple[str, ...]:
        return quant_ensures(self.options)

    def scheme(self, ir: Model) -> QuantScheme:
        o = self.options
        s = QuantScheme(o.bits, o.group_size, o.symmetric, o.scale_dtype)
        for path, lin in block_linears(ir):
            if not isinstance(lin.weight, QuantWeight):
                s.check(lin.in_features, f"--pass {self.name} ({path})")
        for bits, what in ((o.head_bits, "head_bits"), (o.embed_bits, "embed_bits")):  # both hidden_size wide
            if bits:
                ends_scheme(o, bits).check(ir.hidden_size, f"--pass {self.name}:{what}")
        return s
