"""quant.awq: activation-aware weight quantization (AWQ, Lin et al. 2023), groupwise.

Block by block in depth order, on float activations (calibration tokens from calib=FILE;FILE
or data-free samples, see compiler/calib.py; as in the reference implementation, each
block's input is the previous float block's output). For every group of linears that
read one input (q/k/v after attn_norm; all gate/up after ffn_norm; o after attention;
each down after act(gate) * up):

1. Scale search: s = mean|x|^a (clamped at 1e-4, normalized by sqrt(max s * min s)) for
   a on a grid of n_grid points in [0, 1]; keep the s minimizing the group's output error
   ||X W^T - (X/s) Q(W diag s)^T||^2 (a = 0 is plain RTN, so the search never does worse
   than RTN on this loss). The error is exact over every calibration token through the
   Gram matrix X^T X / n for inputs up to 1024 wide, else taken over 1024 evenly spaced
   tokens, and scored on at most 512 evenly spaced output rows (see ErrorSketch).
2. Fold: W <- W diag(s) for the group (and the float router / shared-expert gate, which
   read the same input); 1/s goes into the op before it: the RMSNorm weight (Gemma's
   unit-offset norms store w' = (w + 1)/s - 1), up's rows for down, v's rows for o. o is
   skipped unless n_heads == n_kv_heads (otherwise v's rows cannot carry o's inputs).
   The folded float model computes the same function (tested).
3. Clipping search: per output row and group, the range shrink r in {1, 0.95, ..., 0.55}
   minimizing that group's output error e G_gg e^T (G_gg: the group's block of the scaled
   inputs' Gram matrix, over every token); q and k rows are never clipped (attention
   scores are sensitive, as in the reference code).
4. Quantize the clipped weights with QuantScheme's range-derived scales (RTN).

Deviations from the paper's code: the loss is on the group's linear outputs, not the
whole attention/MLP module's output, and it is scored on a subset of rows (and of tokens
for wide inputs); MoE experts see every calibration token (not only those
routed to them) and share one scale with the router, the shared expert and its gate.

Before:                                  After (bits=4, group_size=32):
  attn_norm: rms(eps=1e-05) f32[576]       attn_norm: rms(eps=1e-05) f32[576]  (w / s)
  q: f32[576,576]                          q: sint4g32[576,576](awq)           (W diag s)
  mlp(silu): gate f32[1536,576] ...        mlp(silu): gate sint4g32[1536,576](awq) ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler import reference
from ..compiler.calib import Site, carry_samples, gram, run_block
from ..compiler.ir import Linear, Model, QuantWeight, Weight
from ..compiler.pass_manager import PassResult, register
from ..compiler.quant import QuantScheme, group_params, quantize_codes, rtn
from ..compiler.spill import Spill, spill_codes, spill_tree
from ..errors import SlmcError
from ._options import CalibOptions, QuantOptions
from ._quant import QuantPass, embedded, quant_ensures, quantize_ends, set_act_bits

N_SHRINK = 10  # clipping ratios 1, 0.95, ..., 0.55 (the reference code's max_shrink=0.5)
EXACT_COLS = 1024  # scale-search error: exact (Gram matrix) up to this input width ...
SKETCH_TOKENS = 1024  # ... else over this many calibration tokens
SEARCH_ROWS = 512  # at most this many output rows score each scale


@dataclass(frozen=True)
class AWQOptions(CalibOptions, QuantOptions):
    n_grid: int = 20  # points of the scale exponent grid over [0, 1]
    # false: search and fold the scales only, leaving an equivalent float model for another
    # quantizer (quant.awq:quantize=false then quant.gptq: AWQ + GPTQ)
    quantize: bool = True


def fake_quant(w: torch.Tensor, s: QuantScheme) -> torch.Tensor:
    """RTN-quantize then dequantize (range-derived scales)."""
    s = s.at(w.shape[1])
    scale, zero = group_params(w, s)
    codes = quantize_codes(w, scale, zero, s).float()
    z = zero.repeat_interleave(s.group_size, 1) if zero is not None else 0.0
    return (codes - z) * scale.repeat_interleave(s.group_size, 1)


class ErrorSketch:
    """The output error ||X E^T||^2 / n of a weight error E, cheaply: exactly via the Gram
    matrix G = X^T X / n for inputs up to EXACT_COLS wide (cost rows x cols^2), else over
    SKETCH_TOKENS evenly spaced tokens. `rows` picks at most SEARCH_ROWS evenly spaced rows
    (rows are independent given the scale, so the subset ranks the scales like the whole)."""

    def __init__(self, x: torch.Tensor, n_rows: int):
        cols = x.shape[1]
        self.G = gram(x) if cols <= EXACT_COLS else None
        self.xs = None if self.G is not None else x[torch.linspace(0, len(x) - 1, min(len(x), SKETCH_TOKENS)).long()]
        self.rows = slice(None, None, -(-n_rows // SEARCH_ROWS))

    def __call__(self, E: torch.Tensor) -> float:
        if self.G is not None:
            return float(((E @ self.G) * E).sum())
        return float((self.xs @ E.T).pow(2).sum()) / len(self.xs)


def search_scale(W: torch.Tensor, sketch: ErrorSketch, x_mean: torch.Tensor, s: QuantScheme,
                 n_grid: int) -> tuple[torch.Tensor, float, float]:
    """The best per-input-channel scale; also its loss and plain RTN's (alpha = 0)."""
    W = W[sketch.rows]
    best, best_loss, rtn_loss = torch.ones_like(x_mean), float("inf"), float("inf")
    for i in range(n_grid):
        alpha = i / max(1, n_grid - 1)
        sc = x_mean.pow(alpha).clamp_min(1e-4)
        sc = sc / (sc.max() * sc.min()).sqrt()
        loss = sketch(W - fake_quant(W * sc, s) / sc)
        if i == 0:
            rtn_loss = loss
        if loss < best_loss:
            best, best_loss = sc, loss
    return best, best_loss, rtn_loss


def group_grams(x: torch.Tensor, g: int) -> torch.Tensor:
    """[ng, g, g]: the diagonal blocks of X^T X / n, one per quantization group."""
    n, cols = x.shape
    out = torch.zeros(cols // g, g, g)
    for i in range(0, n, 4096):
        xv = x[i:i + 4096].reshape(-1, cols // g, g).transpose(0, 1)  # [ng, n, g]
        out += torch.bmm(xv.transpose(1, 2), xv)
    return out / max(1, n)


def clip_quantize(W: torch.Tensor, Gb: torch.Tensor, s: QuantScheme, protect: slice | None = None) -> QuantWeight:
    """Per (row, group) range shrink minimizing the group's output error e Gb[group] e^T, then RTN."""
    rows, cols = W.shape
    s = s.at(cols)
    g, ng = s.group_size, cols // s.group_size
    Wg = W.view(rows, ng, g)
    if s.symmetric:
        hi = Wg.abs().amax(-1, keepdim=True)
        lo = -hi
    else:
        lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    best_r = torch.ones(rows, ng, 1)
    best_err = torch.full((rows, ng), float("inf"))
    for i in range(N_SHRINK):
        r = 1 - i / 20
        E = (fake_quant(torch.clamp(Wg, lo * r, hi * r).reshape(rows, cols), s).view(rows, ng, g) - Wg)
        Et = E.transpose(0, 1)  # [ng, rows, g]
        err = (torch.bmm(Et, Gb) * Et).sum(-1).T  # [rows, ng]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r[better] = r
    if protect is not None:
        best_r[protect] = 1.0
    return rtn(torch.clamp(Wg, lo * best_r, hi * best_r).reshape(rows, cols), s, "awq")


def _scale_cols(lin: Linear, s: torch.Tensor) -> None:
    lin.weight = Weight(lin.weight.float() * s)


def _fold(site: Site, s: torch.Tensor) -> None:
    """W diag(s) for the site's linears, 1/s into the op producing their input."""
    for lin in site.linears + site.extra:
        _scale_cols(lin, s)
    if site.norm is not None:
        n = site.norm
        w = n.weight.float()
        n.weight = Weight((w + 1.0) / s - 1.0 if n.unit_offset else w / s)
    else:
        lin, rows = site.rows
        W = lin.weight.float().clone()
        W[rows] /= s[:, None]
        lin.weight = Weight(W)
        if lin.bias is not None:
            b = lin.bias.float().clone()
            b[rows] /= s
            lin.bias = Weight(b)


def _foldable(site: Site) -> bool:
    lins = site.linears + site.extra
    if any(isinstance(l.weight, QuantWeight) for l in lins):
        return False
    if site.norm is not None:
        return True
    lin, rows = site.rows
    return not isinstance(lin.weight, QuantWeight) and rows.stop - rows.start == site.linears[0].in_features


@register
class QuantAWQ(QuantPass):
    name = "quant.awq"
    Options = AWQOptions

    @property
    def ensures(self) -> tuple[str, ...]:
        return quant_ensures(self.options) if self.options.quantize else ()

    def run(self, ir: Model) -> PassResult:
        return self.apply(ir, quantize=self.options.quantize)

    def apply(self, ir: Model, quantize: bool = True) -> PassResult:
        """quantize=False: search and fold the scales only (the float model stays equivalent)."""
        o = self.options
        if o.n_grid < 1:
            raise SlmcError(f"n_grid must be >= 1 (got {o.n_grid})", "--pass quant.awq")
        s = self.scheme(ir)
        ids, t_calib = o.tokens(ir)
        x = embedded(ir, ids)  # the table's pages let go after the lookup
        done: set[int] = set()
        codes_file = Spill(f"--pass {self.name}")  # each finished block's codes (issue 17)
        # the folded floats of blocks already done go to scratch space (compiler/spill.py), so the
        # next pass reads them back one block at a time instead of finding the model resident
        spill = None if quantize else Spill("--pass quant.awq")
        stats = {"quantized": 0, "scaled_groups": 0, "loss_rtn": 0.0, "loss_awq": 0.0}
        for d in range(ir.n_layers):
            bi = ir.layers[d]
            sites: list[Site] = []
            x_next = run_block(ir.blocks[bi], x, (lambda site: None) if bi in done else sites.append)
            if sites:
                self._block(sites, s, quantize, stats)
                if spill is not None:
                    spill_tree(ir.blocks[bi], spill)
            # the block's codes to scratch space, its checkpoint pages let go: it is done
            spill_codes(ir.blocks[bi], codes_file)
            done.add(bi)
            x = x_next
        if quantize:
            stats["quantized"] += quantize_ends(ir, o, "awq")
            set_act_bits(ir, o, "--pass quant.awq")
        info = {"quantized": stats["quantized"], "scaled_groups": stats["scaled_groups"],
                "scheme": f"{'s' if o.symmetric else 'a'}int{o.bits}g{o.group_size}",
                "calibration": o.describe(),
                "calibration_seconds": round(t_calib, 2)}
        if not quantize and not o.calib:  # the fold kept the float function: the next pass may reuse its samples
            info["samples_carried"] = carry_samples(ids, ir)
        if spill is not None and spill.nbytes:
            info["spilled_mib"] = round(spill.nbytes / 2**20, 1)
        if stats["loss_rtn"] > 0:  # the searched scales' share of plain RTN's output error
            info["scale_search_loss_vs_rtn"] = round(stats["loss_awq"] / stats["loss_rtn"], 4)
        return PassResult(ir, stats["quantized"] + stats["scaled_groups"] > 0, info)

    def _block(self, sites: list[Site], s: QuantScheme, quantize: bool, stats: dict) -> None:
        scales = []
        for site in sites:  # every search sees the block's original weights
            sc = None
            if _foldable(site):
                W = torch.cat([l.weight.float() for l in site.linears])
                sketch = ErrorSketch(site.x, W.shape[0])
                sc, loss, loss_rtn = search_scale(W, sketch, site.x.abs().mean(0), s, self.options.n_grid)
                stats["loss_awq"] += loss
                stats["loss_rtn"] += loss_rtn
            scales.append(sc)
        for site, sc in zip(sites, scales):
            if sc is not None:
                _fold(site, sc)
                stats["scaled_groups"] += 1
        if not quantize:
            return
        for site, sc in zip(sites, scales):
            Gb = group_grams(site.x / sc if sc is not None else site.x, s.at(site.x.shape[-1]).group_size)  # of the inputs x / s
            for lin in site.linears:
                if isinstance(lin.weight, QuantWeight):
                    continue
                lin.weight = clip_quantize(lin.weight.float(), Gb, s, self._protect(site, lin))
                stats["quantized"] += 1

    @staticmethod
    def _protect(site: Site, lin: Linear) -> slice | None:
        """Rows kept unclipped: q and k (their errors go through the softmax)."""
        a = site.attn
        if site.name != "attn_in":
            return None
        if a.fused:
            return slice(0, (a.n_heads + a.n_kv_heads) * a.head_dim)
        return slice(None) if lin is a.q or lin is a.k else None
