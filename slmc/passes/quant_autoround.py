"""quant.autoround: groupwise weight quantization with rounding learned per block (AutoRound,
Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent"; the range multipliers
are OmniQuant's learnable weight clipping).

Sequential, one block at a time in depth order, on calibration tokens (the user's text via
calib=FILE;FILE, else data-free samples from the model, see compiler/calib.py). For every block
linear (the ones quant.gptq quantizes: q/k/v or qkv, o, gate/up or gate_up, down, every expert's;
routers stay float) the quantized weight is

    sym:  s = mult * max|W_g| / qmax                   w = clamp(round(W / s + V), qmin, qmax) * s
    asym: s = (mult_hi * hi_g - mult_lo * lo_g) / qmax, z = round(-mult_lo * lo_g / s)
                                                      w = (clamp(round(W / s + V + z), qmin, qmax) - z) * s

with one rounding offset V in [-0.5, 0.5] per weight and one range multiplier per (row, group)
in [min_scale, 1] (scales=true; two, for the low and high end, when asymmetric). At V = 0 and
mult = 1 this is quant.rtn exactly. The block's offsets and multipliers start there and take
`iters` signed-gradient steps (lr, 1/iters by default, decaying linearly to 0; round() passes
gradients straight through) on the mean squared error between the quantized block's output and
the float block's output, each step on `batch` calibration sequences drawn at random (seeded).
The input of the quantized block is the quantized model's activations (the blocks before it
already quantized); the target is the float block on the float model's own activations
(float_input=true, as in AutoRound: a block may make up for its predecessors' error), or on the
quantized model's (false). After the last step the whole calibration set decides: the learned
rounding is kept only if its block error is below RTN's (else RTN is kept). The codes and scales
are written as ordinary groupwise QuantWeights (the same scheme as quant.rtn/gptq/awq, so every
target's artifact is unchanged in layout). A block used at several depths is learned once, at
its first depth. With embed_bits/head_bits the embedding and head are rounded (RTN) first.
The passes compose: quant.awq:quantize=false before it learns the rounding of AWQ's rescaled
(float-equivalent) weights.

Cost: about 3 x a block's forward on batch x seq_len tokens per step, so iters x n_layers
steps in all. Measured (bench/results/quant_calib.md, SmolLM2-135M int4 g32, iters=100, batch=4,
16x256 tokens of Emma, perplexity on unseen text): +8.1 % alone, +5.5 % after AWQ's scales (AWQ
scales + GPTQ: +8.4 %), at 1400 s on one thread against GPTQ's 73 s; data-free no gain: +13.5 %
alone, +10.9 % after AWQ's scales (AWQ scales + GPTQ on the same samples: +10.7 %).

Before:                                  After (bits=4, group_size=32):
  q: f32[576,576]                          q: sint4g32[576,576](autoround)
  mlp(silu): gate f32[1536,576] ...        mlp(silu): gate sint4g32[1536,576](autoround) ...
  lm_head: tied to embed                   lm_head: tied to embed        (head_bits=0)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..compiler import reference
from ..compiler.calib import Site, run_block
from ..compiler.ir import Block, Linear, Model, QuantWeight
from ..compiler.pass_manager import PassResult, register
from ..compiler.quant import QuantScheme, group_params
from ..compiler.spill import Spill, spill_codes
from ..errors import SlmcError
from ._options import CalibOptions, QuantOptions
from ._quant import QuantPass, embedded, quantize_ends, set_act_bits

EVAL_SEQS = 8  # sequences per no-grad forward when a whole calibration set runs through a block


@dataclass(frozen=True)
class AutoRoundOptions(CalibOptions, QuantOptions):
    iters: int = 200  # signed-gradient steps per block (AutoRound's default)
    lr: float = 0.0  # step size of V and the multipliers; 0: 1 / iters; decays linearly to 0
    batch: int = 4  # calibration sequences per step
    scales: bool = True  # learn each (row, group)'s range multiplier in [min_scale, 1]
    min_scale: float = 0.5
    float_input: bool = True  # target: the float block on the float model's activations


def _ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y's value, x's gradient (straight through)."""
    return x + (y - x).detach()


def _round_scale(sc: torch.Tensor, s: QuantScheme) -> torch.Tensor:
    """Scales as QuantScheme stores them (bf16/fp16 for scale_dtype): group_params does that
    rounding; a [rows, 1] column of ones scaled by sc has sc as its range-derived scale."""
    if s.scale_dtype == "float32":
        return sc
    return group_params((sc * s.qmax).reshape(-1, 1), QuantScheme(s.bits, 1, True, s.scale_dtype))[0].view_as(sc)


class Learned:
    """A block linear's weight while its rounding is learned: `float()` is the fake-quantized
    weight of the current V and multipliers (refresh() recomputes it, with gradients when
    enabled); `quant_weight()` the same as a QuantWeight."""

    act_bits = 0

    def __init__(self, w: torch.Tensor, s: QuantScheme, learn_scales: bool):
        rows, cols = w.shape
        self.s, self.W, self.shape = s.at(cols), w, (rows, cols)
        g = self.s.group_size
        Wg = w.view(rows, cols // g, g)
        if self.s.symmetric:
            self.lo, self.hi = None, Wg.abs().amax(-1)
        else:
            self.lo, self.hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
        self.V = torch.zeros_like(w, requires_grad=True)
        ones = (lambda: torch.ones(rows, cols // g, requires_grad=learn_scales))
        self.m_hi, self.m_lo = ones(), (ones() if not self.s.symmetric else None)
        self.cur: torch.Tensor | None = None

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.V, self.m_hi, self.m_lo) if p is not None and p.requires_grad]

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params()]

    def load(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params(), state):
                p.copy_(v)

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes as floats, scales [rows, groups], zeros or None), differentiable in V and mult."""
        s, g = self.s, self.s.group_size
        if s.symmetric:
            sc = (self.hi * self.m_hi / s.qmax).clamp_min(1e-12)
        else:
            lo, hi = self.lo * self.m_lo, self.hi * self.m_hi
            sc = ((hi - lo) / s.qmax).clamp_min(1e-12)
        sc = _ste(sc, _round_scale(sc.detach(), s))
        z = None if s.symmetric else _ste(-lo / sc, torch.round(-lo / sc)).clamp(s.qmin, s.qmax)
        x = self.W / sc.repeat_interleave(g, 1) + self.V
        if z is not None:
            x = x + z.repeat_interleave(g, 1)
        return _ste(x, torch.round(x)).clamp(s.qmin, s.qmax), sc, z

    def refresh(self) -> None:
        q, sc, z = self._codes()
        g = self.s.group_size
        if z is not None:
            q = q - z.repeat_interleave(g, 1)
        self.cur = q * sc.repeat_interleave(g, 1)

    def float(self) -> torch.Tensor:
        return self.cur

    def step(self, lr: float, min_scale: float) -> None:
        """One signed-gradient step, then V and the multipliers back into their ranges."""
        with torch.no_grad():
            for p in self.params():
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-lr)
                    p.grad = None
            self.V.clamp_(-0.5, 0.5)
            for m in (self.m_hi, self.m_lo):
                if m is not None:
                    m.clamp_(min_scale, 1.0)

    @torch.no_grad()
    def quant_weight(self) -> QuantWeight:
        q, sc, z = self._codes()
        s = self.s
        return QuantWeight(codes=q.to(s.code_dtype), scales=sc.float().contiguous(),
                           zeros=z.float().contiguous() if z is not None else None, group_size=s.group_size,
                           bits=s.bits, symmetric=s.symmetric, algorithm="autoround")


@torch.no_grad()
def block_out(b: Block, x: torch.Tensor, refresh: list[Learned] = ()) -> torch.Tensor:
    """The block's output on x [N, T, hidden], EVAL_SEQS sequences at a time."""
    for lw in refresh:
        lw.refresh()
    pos = torch.arange(x.shape[1])
    return torch.cat([reference.block(b, x[i:i + EVAL_SEQS], pos) for i in range(0, len(x), EVAL_SEQS)])


def block_mse(b: Block, x: torch.Tensor, y: torch.Tensor, learned: list[Learned]) -> float:
    out = block_out(b, x, learned)
    return float(sum(((out[i:i + EVAL_SEQS] - y[i:i + EVAL_SEQS]) ** 2).sum() for i in range(0, len(x), EVAL_SEQS))
                 / y.numel())


@register
class QuantAutoRound(QuantPass):
    name = "quant.autoround"
    Options = AutoRoundOptions

    def run(self, ir: Model) -> PassResult:
        o = self.options
        if o.iters < 1 or o.batch < 1 or not o.lr >= 0 or not 0 < o.min_scale <= 1:
            raise SlmcError(f"need iters >= 1, batch >= 1, lr >= 0 and 0 < min_scale <= 1 (got {o.iters}, "
                            f"{o.batch}, {o.lr}, {o.min_scale})", "--pass quant.autoround")
        s = self.scheme(ir)
        ids, t_calib = o.tokens(ir)
        n = quantize_ends(ir, o, "rtn")
        gen = torch.Generator().manual_seed(o.seed)
        x_q = embedded(ir, ids)  # the quantized model's activations
        x_f = x_q if o.float_input else None  # the float model's (float_input)
        floats: dict[int, list[tuple[Linear, object]]] = {}  # float weights of blocks used again later
        stats = {"loss_rtn": 0.0, "loss": 0.0, "kept_rtn": 0}
        t0 = time.perf_counter()
        done: set[int] = set()
        codes_file = Spill(f"--pass {self.name}")  # each finished block's codes (issue 17)
        for d in range(ir.n_layers):
            bi, b = ir.layers[d], ir.blocks[ir.layers[d]]
            if bi in done:  # learned at an earlier depth
                if x_f is not None:  # the float stream through the block's float weights
                    x_f = _with_weights(b, floats.get(bi, []), x_f)
                x_q = block_out(b, x_q)
                continue
            sites: list[Site] = []
            y = run_block(b, x_f if x_f is not None else x_q, sites.append)  # the float target
            lins = [lin for site in sites for lin in site.linears if not isinstance(lin.weight, QuantWeight)]
            if bi in ir.layers[d + 1:] and x_f is not None:
                floats[bi] = [(lin, lin.weight) for lin in lins]
            if lins:
                n += self._learn(b, lins, x_q, y, s, gen, stats)
            x_q = block_out(b, x_q)
            x_f = y if x_f is not None else None
            done.add(bi)
            # the block's codes to scratch space, its checkpoint pages let go: it is done
            spill_codes(b, codes_file)
        set_act_bits(ir, o, "--pass quant.autoround")
        info = {"quantized": n, "scheme": f"{'s' if o.symmetric else 'a'}int{o.bits}g{o.group_size}",
                "calibration": o.describe(), "calibration_seconds": round(t_calib, 2),
                "learn_seconds": round(time.perf_counter() - t0, 1), "blocks_kept_rtn": stats["kept_rtn"]}
        if stats["loss_rtn"] > 0:  # the learned rounding's share of RTN's block output error
            info["block_loss_vs_rtn"] = round(stats["loss"] / stats["loss_rtn"], 4)
        return PassResult(ir, n > 0, info)

    def _learn(self, b: Block, lins: list[Linear], x: torch.Tensor, y: torch.Tensor, s: QuantScheme,
               gen: torch.Generator, stats: dict) -> int:
        """Learn the rounding of the block's linears (float weights in place) against y; then
        they hold QuantWeights. Returns how many weights were quantized."""
        o = self.options
        learned: dict[int, tuple[object, Learned]] = {}  # one weight object under several linears: once
        for lin in lins:
            if id(lin.weight) not in learned:
                learned[id(lin.weight)] = (lin.weight, Learned(lin.weight.float(), s, o.scales))
        order = [learned[id(lin.weight)] for lin in lins]
        for lin, (_, lw) in zip(lins, order):
            lin.weight = lw
        lws = [lw for _, lw in learned.values()]
        loss_rtn = block_mse(b, x, y, lws)
        init = [lw.state() for lw in lws]
        lr0 = o.lr or 1.0 / o.iters
        pos = torch.arange(x.shape[1])
        for t in range(o.iters):
            idx = torch.randperm(len(x), generator=gen)[:o.batch]
            with torch.enable_grad():
                for lw in lws:
                    lw.refresh()
                torch.nn.functional.mse_loss(reference.block(b, x[idx], pos), y[idx]).backward()
            lr = lr0 * (1 - t / o.iters)
            for lw in lws:
                lw.step(lr, o.min_scale)
        loss = block_mse(b, x, y, lws)
        if not loss < loss_rtn:  # the whole calibration set says RTN is better: keep RTN
            for lw, st in zip(lws, init):
                lw.load(st)
            loss, stats["kept_rtn"] = loss_rtn, stats["kept_rtn"] + 1
        stats["loss_rtn"] += loss_rtn
        stats["loss"] += loss
        qw = {id(lw): lw.quant_weight() for lw in lws}
        for lin, (w, lw) in zip(lins, order):
            lin.weight = qw[id(lw)]
        for w, _ in learned.values():
            if hasattr(w, "release"):
                w.release()  # the float copy can be re-read from the checkpoint if ever needed
        return len(lws)


def _with_weights(b: Block, weights: list[tuple[Linear, object]], x: torch.Tensor) -> torch.Tensor:
    """The block's output on x with the given (float) weights in place of its quantized ones."""
    now = [(lin, lin.weight) for lin, _ in weights]
    for lin, w in weights:
        lin.weight = w
    try:
        return block_out(b, x)
    finally:
        for lin, w in now:
            lin.weight = w
