"""Which quantized tensors a target (backend) can hold exactly, as data.

Each target names a QuantRules; `check` walks the IR's QuantWeights and returns the
first one the runtime cannot hold bit for bit, with what to change. A target never
re-rounds codes silently: either slmc's codes and scales go in unchanged, or compile
refuses and says which recipe/options would fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.ir import Model, QuantWeight, block_linears


@dataclass(frozen=True)
class Rule:
    bits: tuple[int, ...]
    symmetric_only: bool = False
    act_bits: tuple[int, ...] = (0,)  # allowed activation quantization
    bf16_scales: bool = False  # the runtime stores blockwise scales as bf16
    scale_dtype: str | None = None  # the runtime stores every scale in this dtype
    per_channel_bits: tuple[int, ...] = ()  # bit widths it holds with one scale per row only
    integer_zeros: bool = True  # zero points must be integers (GGUF Q4_1's are fractional)
    note: str = ""


@dataclass(frozen=True)
class QuantRules:
    name: str
    linear: Rule | None  # None: quantized linears are not supported at all
    embedding: Rule | None
    tied_quantized_head: bool = True  # a quantized embedding may also serve as the head
    linear_8da: Rule | None = None  # another rule for linears with int8 activations (act_bits=8)
    none_reason: str = "this target holds no quantized tensors of this kind"

    def check(self, model: Model) -> str | None:
        if model.lm_head is None and isinstance(model.embed, QuantWeight) and not self.tied_quantized_head:
            return (f"{self.name} cannot use one quantized table as both embedding and output head; "
                    "quantize the head separately (head_bits=...)")
        for where, w, rule in _quant_tensors(model, self):
            if rule is self.linear and w.act_bits == 8 and self.linear_8da is not None:
                rule = self.linear_8da
            why = _violation(w, rule) if rule is not None else self.none_reason
            if why:
                acts = f"int{w.act_bits} activations" if w.act_bits else "float activations"
                return f"{self.name}: {where} is {w.dtype} with {acts}: {why}"
        return None


def _quant_tensors(model: Model, rules: QuantRules):
    if isinstance(model.embed, QuantWeight):
        yield "embed", model.embed, rules.embedding
        if model.lm_head is None:
            yield "tied lm_head", model.embed, rules.linear
    if model.lm_head is not None and isinstance(model.lm_head.weight, QuantWeight):
        yield "lm_head", model.lm_head.weight, rules.linear
    for path, lin in block_linears(model, routers=True):
        if isinstance(lin.weight, QuantWeight):
            yield path, lin.weight, rules.linear


def _violation(w: QuantWeight, rule: Rule | None) -> str | None:
    if w.bits not in rule.bits:
        return f"only {'/'.join(map(str, rule.bits))}-bit codes fit{rule.note}"
    if rule.symmetric_only and not w.symmetric:
        return f"only symmetric codes fit (quantize with symmetric=true){rule.note}"
    if w.bits in rule.per_channel_bits and w.group_size != w.shape[1]:
        return f"{w.bits}-bit codes fit per channel only (quantize with group_size=0){rule.note}"
    if rule.integer_zeros and w.zeros is not None and not bool((w.zeros == w.zeros.round()).all()):
        return f"its zero points are fractional and this runtime stores integer offsets{rule.note}"
    if w.act_bits not in rule.act_bits:
        want = " or ".join("float activations" if a == 0 else f"act_bits={a}" for a in rule.act_bits)
        return f"needs {want}{rule.note}"
    blockwise = w.group_size < w.shape[1]
    if rule.bf16_scales and blockwise and not torch.equal(w.scales.to(torch.bfloat16).float(), w.scales.float()):
        return ("its scales are not bf16 values and this runtime stores bf16 scales "
                f"(quantize with scale_dtype=bfloat16){rule.note}")
    if rule.scale_dtype and not torch.equal(w.scales.to(getattr(torch, rule.scale_dtype)).float(),
                                            w.scales.float()):
        return (f"its scales are not {rule.scale_dtype} values and this runtime stores {rule.scale_dtype} "
                f"scales{rule.note}")
    return None


def imported(w: QuantWeight) -> bool:
    """Codes that came from a pre-quantized checkpoint (--keep-codes), not from slmc's passes."""
    return w.algorithm.startswith("gguf:") or "import" in w.algorithm


def _fit_options(w: QuantWeight, rule: Rule) -> str:
    """quant.requant options that turn w into the nearest scheme `rule` holds."""
    bits = w.bits if w.bits in rule.bits else max(rule.bits)
    group = 0 if bits in rule.per_channel_bits else -1
    sym = "true" if rule.symmetric_only else "keep"
    scale = rule.scale_dtype or ("bfloat16" if rule.bf16_scales and group else "float32")
    act = w.act_bits if w.act_bits in rule.act_bits else rule.act_bits[0]
    return f"only_bits={w.bits},bits={bits},group_size={group},symmetric={sym},scale_dtype={scale},act_bits={act}"


def fit_passes(model: Model, rules: QuantRules | None) -> list[str]:
    """`quant.requant` pass specs that move imported codes this runtime cannot hold into the
    nearest scheme it can (per role: block linears by bit width, head, embedding). Codes the
    runtime holds stay untouched; a runtime with no quantized storage at all gets none (it
    then refuses, with its reason)."""
    if rules is None or rules.linear is None:
        return []
    out = []
    tied = model.lm_head is None and isinstance(model.embed, QuantWeight)
    head = model.embed if tied else (model.lm_head.weight if model.lm_head is not None else None)
    wrong: dict[int, QuantWeight] = {}
    for _, lin in block_linears(model, routers=True):
        w = lin.weight
        if isinstance(w, QuantWeight) and imported(w) and _violation(w, rules.linear):
            wrong.setdefault(w.bits, w)
    out += [f"quant.requant:scope=linears,{_fit_options(w, rules.linear)}" for _, w in sorted(wrong.items())]
    if isinstance(head, QuantWeight) and imported(head):
        split = tied and not rules.tied_quantized_head
        if split or _violation(head, rules.linear):
            out.append(f"quant.requant:scope=head,untie={str(split).lower()},{_fit_options(head, rules.linear)}")
    if isinstance(model.embed, QuantWeight) and imported(model.embed) and rules.embedding is not None:
        if _violation(model.embed, rules.embedding):
            # a tied head the linear rule accepted keeps the codes it had
            out.append(f"quant.requant:scope=embed,untie={str(tied).lower()},"
                       f"{_fit_options(model.embed, rules.embedding)}")
    return out
