"""ExecuTorch's two int4 packers, a block of rows at a time (issue 17).

XNNPACK's `NodeVisitor.convert_to_qc4w` (each 4-bit linear weight) and the quantized
embedding's `quant_fusion::_pack_embedding_weight` (constant-folded in to_executorch) each make
their packed table from whole-table temporaries: codes + 8 as uint8, a shifted half and the
packed result. On a 128k-row vocabulary at 2048 wide (Llama-3.2-1B's head and embedding) that is
about 500 MiB at once beside the 250 MiB of codes: the peaks of to_edge + XNNPACK partitioning
and of to_executorch (measured with a probe, bench/README.md). `chunked_packing()` swaps in
versions that fill the packed table a block of rows at a time: the same bytes (tested against
ExecuTorch's own), one packed table plus a block of temporaries. Odd widths and the other bit
widths go to ExecuTorch's own code.
"""

from __future__ import annotations

import contextlib

import torch

BLOCK_ELEMS = 1 << 22  # codes per block (4 MiB of int8)


def _rows(n_rows: int, width: int) -> int:
    return max(1, BLOCK_ELEMS // max(1, width))


def pack_qc4w(inp: torch.Tensor) -> torch.Tensor:
    """XNNPACK's qc4w layout of int8 codes in [-8, 7], [oc, ic] with ic even: per row, byte k
    holds code 2k + 1 (high nibble) and code 2k (low), each + 8."""
    oc, ic = inp.shape
    out = torch.empty(oc, ic // 2, dtype=torch.uint8)
    step = _rows(oc, ic)
    for r in range(0, oc, step):
        x = (inp[r:r + step].to(dtype=torch.uint8) + 8).contiguous().view(-1)
        out[r:r + step] = (x[1::2] << 4 | x[::2]).view(-1, ic // 2)
    return out


def pack_embedding_4bit(weight: torch.Tensor) -> torch.Tensor:
    """quant_fusion::_pack_embedding_weight at bitwidth 4: byte k holds code 2k (high nibble)
    and code 2k + 1 (low), each + 8."""
    n, d = weight.shape
    out = torch.empty(n, d // 2, dtype=torch.uint8)
    step = _rows(n, d)
    for r in range(0, n, step):
        v = weight[r:r + step].add(8).view(torch.uint8).view(-1, d // 2, 2)
        out[r:r + step] = v[:, :, 0] << 4 | v[:, :, 1]
    return out


@contextlib.contextmanager
def chunked_packing():
    """While ExecuTorch lowers: both packers fill their table a block of rows at a time."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
    from executorch.exir.passes import _quant_patterns_and_replacements as qpr

    orig_qc4w = NodeVisitor.__dict__["convert_to_qc4w"]  # a staticmethod

    def convert_to_qc4w(inp):
        if inp.ndim != 2 or inp.shape[-1] % 2:  # ExecuTorch squeezes and pads: its own path
            return orig_qc4w.__func__(inp)
        lo, hi = inp.min().item(), inp.max().item()
        assert hi <= 7 and lo >= -8, f"convert_to_qc4w: [min,max] out of [-8, 7] range, got [{lo}, {hi}]"
        return pack_qc4w(inp)

    op = qpr._pack_embedding_weight
    fns = getattr(op, "_backend_fns", None)  # torch's custom op: its Python kernel per device type
    orig_embed = fns.get(None) if isinstance(fns, dict) else None

    def pack_embedding_weight(weight, bitwidth):
        if bitwidth == 4 and weight.ndim == 2 and weight.shape[1] % 2 == 0:
            return pack_embedding_4bit(weight)
        return orig_embed(weight, bitwidth)

    NodeVisitor.convert_to_qc4w = staticmethod(convert_to_qc4w)
    if orig_embed is not None:
        fns[None] = pack_embedding_weight
    try:
        yield
    finally:
        NodeVisitor.convert_to_qc4w = orig_qc4w
        if orig_embed is not None:
            fns[None] = orig_embed
