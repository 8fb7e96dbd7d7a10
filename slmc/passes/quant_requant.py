"""quant.requant: re-round quantized weights into a scheme a runtime can hold, measuring the cost.

Imported checkpoints (GGUF Q4_1, AutoAWQ, ...) bring their own codes. When the chosen
target can hold them they go in unchanged; when it cannot (XNNPACK takes symmetric
codes with bf16 scales and int8 activations only, Core ML integer offsets only) the
compiler adds this pass with the nearest scheme the target holds. Each tensor in scope
that does not already match is dequantized exactly and re-quantized with RTN; the pass
reports the relative RMS error it added, per tensor and overall (manifest `pipeline`).

scope: linears (block projections), head, or embed. A tied head that must differ
from its embedding (XNNPACK cannot share one quantized table) gets its own node.

Before (GGUF Q4_1, --keep-codes):        After (quant.requant:scope=linears,only_bits=4,
                                          symmetric=true,scale_dtype=bfloat16,act_bits=8):
  q: aint4g32[576,576](gguf:q4_1+zeros)    q: sint4g32[576,576](gguf:q4_1+requant,act int8)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.ir import Linear, Model, QuantWeight, block_linears
from ..compiler.pass_manager import Pass, PassResult, register
from ..compiler.quant import QuantScheme, rtn
from ..errors import SlmcError

SCOPES = ("linears", "head", "embed")


@dataclass(frozen=True)
class RequantOptions:
    scope: str = "linears"
    only_bits: int = 0  # touch only tensors of this bit width (0: all in scope)
    bits: int = 0  # 0: keep each tensor's bit width
    group_size: int = -1  # -1: keep; 0: one group per row (per channel)
    symmetric: str = "keep"  # keep | true | false
    scale_dtype: str = "float32"  # scales must be exact in this dtype (float32: any)
    act_bits: int = -1  # -1: keep
    untie: bool = False  # scope=head: give a tied head its own quantized node


def matches(w: QuantWeight, s: QuantScheme, act_bits: int) -> bool:
    """w already is in scheme s: same layout, integer zeros, scales exact in s.scale_dtype."""
    s = s.at(w.shape[1])
    if (w.bits, w.group_size, w.symmetric, w.act_bits) != (s.bits, s.group_size, s.symmetric, act_bits):
        return False
    if w.zeros is not None and not bool((w.zeros == w.zeros.round()).all()):
        return False
    dt = getattr(torch, s.scale_dtype)
    return bool(torch.equal(w.scales.to(dt).float(), w.scales.float()))


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


@register
class QuantRequant(Pass):
    name = "quant.requant"
    Options = RequantOptions

    def _scheme(self, w: QuantWeight) -> QuantScheme:
        o = self.options
        g = w.group_size if o.group_size < 0 else o.group_size
        sym = w.symmetric if o.symmetric == "keep" else o.symmetric == "true"
        return QuantScheme(o.bits or w.bits, g, sym, o.scale_dtype)

    def _requant(self, w: QuantWeight, where: str, errs: dict, force: bool = False) -> QuantWeight:
        o = self.options
        if o.only_bits and w.bits != o.only_bits:
            return w
        s = self._scheme(w)
        act = w.act_bits if o.act_bits < 0 else o.act_bits
        if matches(w, s, act) and not force:
            return w
        s.check(w.shape[1], f"--pass quant.requant ({where})")
        ref = w.float()
        out = rtn(ref, s, algorithm=w.algorithm if w.algorithm.endswith("+requant") else w.algorithm + "+requant")
        out.act_bits = act
        errs[where] = rel_rms(out.float(), ref)
        return out

    def run(self, ir: Model) -> PassResult:
        o = self.options
        if o.scope not in SCOPES:
            raise SlmcError(f"scope {o.scope!r}: one of {', '.join(SCOPES)}", "--pass quant.requant")
        if o.act_bits not in (-1, 0, 8):
            raise SlmcError(f"act_bits={o.act_bits}: -1 (keep), 0 or 8", "--pass quant.requant")
        if o.symmetric not in ("keep", "true", "false"):
            raise SlmcError(f"symmetric={o.symmetric!r}: keep, true or false", "--pass quant.requant")
        errs: dict[str, float] = {}
        if o.scope == "linears":
            done: dict[int, QuantWeight] = {}
            for path, lin in block_linears(ir):
                if isinstance(lin.weight, QuantWeight):
                    if id(lin.weight) not in done:  # shared weights stay shared
                        done[id(lin.weight)] = self._requant(lin.weight, path, errs)
                    lin.weight = done[id(lin.weight)]
        elif o.scope == "embed":
            if isinstance(ir.embed, QuantWeight):
                if ir.lm_head is None and o.untie:
                    ir.lm_head = Linear(ir.embed)
                ir.embed = self._requant(ir.embed, "embed", errs)
        else:
            if ir.lm_head is None and isinstance(ir.embed, QuantWeight) and o.untie:
                ir.lm_head = Linear(self._requant(ir.embed, "lm_head", errs, force=True))
            elif ir.lm_head is not None and isinstance(ir.lm_head.weight, QuantWeight):
                ir.lm_head.weight = self._requant(ir.lm_head.weight, "lm_head", errs)
        info = {"requantized": len(errs)}
        if errs:
            worst = max(errs, key=errs.get)
            info.update(rel_rms_err_mean=round(sum(errs.values()) / len(errs), 6),
                        rel_rms_err_max=round(errs[worst], 6), worst=worst)
        return PassResult(ir, bool(errs), info)
