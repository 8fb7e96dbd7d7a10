"""quant.mixed: keep the most sensitive block linears at high_bits within a size budget; the
quantization pass after it (quant.rtn/gptq/awq) rounds the rest at the low bit width.

1. Cost: every float block linear (a weight shared by several depths counts once) has its
   size at `bits`/`group_size` and at `high_bits`/`high_group_size` (codes and float32
   scales, as QuantWeight.nbytes counts them); budget * (all of them at the low scheme) is
   how many extra bytes may go to high_bits.
2. Sensitivity: the second-order estimate of what rounding one linear alone adds to the
   calibration loss (next-token cross-entropy on CalibOptions' tokens: your text, or
   data-free samples from the model), 1/2 sum_i F_ii (dW_low,i^2 - dW_high,i^2), where
   dW = RTN(W) - W at each scheme and F_ii is the empirical Fisher diagonal (squared
   gradients of each calibration sequence's loss, summed) taken through the reference
   executor (as SqueezeLLM and HAWQ rank layers). One forward and backward per sequence,
   not one forward per linear.
3. Choice: by sensitivity per extra byte, greedily, every linear that still fits the budget;
   those are quantized here (RTN at high_bits; 8-bit per channel is what every target with
   int4 linears also holds: XNNPACK's 8da8w, LiteRT, Core ML). The next pass skips them, as
   it skips every linear already quantized.

Targets check each quantized tensor against their quant rules at compile, so a mix a runtime
cannot hold is refused there with its reason (e.g. XNNPACK holds 8-bit codes per channel
only: high_group_size=32 is refused; ONNX holds no quantized weights yet). The manifest's
quantization summary counts each scheme, and this pass's info lists the linears kept high.

Before:                                   After (budget=0.1), then quant.gptq:bits=4,group_size=32:
  q: f32[576,576]                           q: sint4g32[576,576](gptq)
  v: f32[192,576]                           v: sint8g576[192,576](rtn)      (most sensitive)
  mlp(silu): down f32[576,1536]             mlp(silu): down sint8g1536[576,1536](rtn) ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compiler import reference
from ..compiler.ir import Model, Weight, block_linears
from ..compiler.pass_manager import Pass, PassResult, register
from ..compiler.quant import QuantScheme, rtn
from ..errors import SlmcError
from ._options import CalibOptions

WHERE = "--pass quant.mixed"


@dataclass(frozen=True)
class MixedOptions(CalibOptions):
    budget: float = 0.10  # extra bytes allowed, as a fraction of the block linears at the low scheme
    bits: int = 4  # the scheme the next pass applies (give it the same bits/group_size)
    group_size: int = 32
    high_bits: int = 8
    high_group_size: int = 0  # 0: one group per row (XNNPACK holds 8-bit codes per channel only)
    symmetric: bool = True
    scale_dtype: str = "float32"
    n_seqs: int = 8  # one forward and backward each
    seq_len: int = 128


def scheme_bytes(shape: tuple[int, int], s: QuantScheme) -> int:
    """Bytes of a [rows, cols] weight at scheme s (codes + float32 scales, + zeros if asymmetric)."""
    rows, cols = shape
    g = s.at(cols).group_size
    groups = rows * (cols // g)
    return rows * cols * s.bits // 8 + groups * 4 * (1 if s.symmetric else 2)


def fisher_diagonal(ir: Model, ids: torch.Tensor, weights: dict[int, Weight]) -> dict[int, torch.Tensor]:
    """Sum over calibration sequences of the squared gradient of each sequence's mean
    next-token loss with respect to each weight in `weights` (keyed by id)."""
    leaves = {k: w.float().detach().clone().requires_grad_(True) for k, w in weights.items()}
    lins = [lin for _, lin in block_linears(ir) if id(lin.weight) in leaves]
    originals = [lin.weight for lin in lins]
    for lin in lins:
        lin.weight = Weight(leaves[id(lin.weight)])
    fisher = {k: torch.zeros_like(t) for k, t in leaves.items()}
    positions = torch.arange(ids.shape[1])
    try:
        with torch.enable_grad():
            for seq in ids:
                x = reference.embed(ir, seq[None])
                for d in range(ir.n_layers):
                    x = reference.block(ir.block_at(d), x, positions)
                logits = reference.head(ir, x)[0, :-1]
                loss = F.cross_entropy(logits.float(), seq[1:])
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                for k, g in zip(leaves, grads):
                    if g is not None:
                        fisher[k] += g.square()
    finally:
        for lin, w in zip(lins, originals):
            lin.weight = w
    return fisher


def choose(sens: dict[int, float], cost: dict[int, int], allowed: float) -> list[int]:
    """Greedy knapsack: highest sensitivity per extra byte first, every one that still fits."""
    chosen, used = [], 0
    for k in sorted(sens, key=lambda k: sens[k] / max(cost[k], 1), reverse=True):
        if sens[k] > 0 and used + cost[k] <= allowed:
            chosen.append(k)
            used += cost[k]
    return chosen


@register
class QuantMixed(Pass):
    name = "quant.mixed"
    Options = MixedOptions
    requires = ("float_weights",)

    def run(self, ir: Model) -> PassResult:
        o = self.options
        if not o.budget >= 0:
            raise SlmcError(f"budget must be >= 0 (a fraction of the low scheme's bytes; got {o.budget})", WHERE)
        low = QuantScheme(o.bits, o.group_size, o.symmetric, o.scale_dtype)
        high = QuantScheme(o.high_bits, o.high_group_size, o.symmetric, o.scale_dtype)
        weights: dict[int, Weight] = {}
        paths: dict[int, list[str]] = {}
        for path, lin in block_linears(ir):
            low.check(lin.in_features, f"{WHERE} ({path})")
            high.check(lin.in_features, f"{WHERE} ({path})")
            weights.setdefault(id(lin.weight), lin.weight)
            paths.setdefault(id(lin.weight), []).append(path)
        cost = {k: scheme_bytes(w.shape, high) - scheme_bytes(w.shape, low) for k, w in weights.items()}
        if any(c <= 0 for c in cost.values()):
            raise SlmcError(f"high_bits={o.high_bits} (group {o.high_group_size}) is not larger than "
                            f"bits={o.bits} (group {o.group_size}) on every linear", WHERE)
        uniform = sum(scheme_bytes(w.shape, low) for w in weights.values())
        allowed = o.budget * uniform
        ids, t_calib = o.tokens(ir)
        fisher = fisher_diagonal(ir, ids, weights)
        sens = {}
        for k, w in weights.items():
            W = w.float()
            d_low = rtn(W, low).float() - W
            d_high = rtn(W, high).float() - W
            sens[k] = 0.5 * float((fisher[k] * (d_low.square() - d_high.square())).sum())
        chosen = choose(sens, cost, allowed)
        done = {k: rtn(weights[k].float(), high) for k in chosen}
        for _, lin in block_linears(ir):
            if id(lin.weight) in done:
                lin.weight = done[id(lin.weight)]
        ranked = sorted(sens, key=sens.get, reverse=True)
        info = {"high": [p for k in chosen for p in paths[k]],
                "high_scheme": f"{'s' if o.symmetric else 'a'}int{o.high_bits}g{o.high_group_size}",
                "low_scheme": f"{'s' if o.symmetric else 'a'}int{o.bits}g{o.group_size}",
                "uniform_bytes": uniform, "budget_bytes": int(allowed),
                "extra_bytes": sum(cost[k] for k in chosen),
                "most_sensitive": [[paths[k][0], round(sens[k], 6)] for k in ranked[:8]],
                "calibration": o.describe(), "calibration_seconds": round(t_calib, 2)}
        return PassResult(ir, bool(chosen), info)
