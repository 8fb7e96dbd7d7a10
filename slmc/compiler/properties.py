"""IR properties: what a pass needs to hold before it runs, and what it promises after.

Each property is data: a name, what it means in words, a function returning None when
it holds or one clause naming the first place it does not, and what to do when a pass
that requires it meets an IR without it ({pass} is that pass's name). Passes declare
`requires` and `ensures` as property names; the pass manager checks both (a requirement
that fails is the user's pipeline order, exit 2; a broken promise is a bug in the pass).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .ir import Model, MoE, QuantWeight, block_linears, named_weights


@dataclass(frozen=True)
class Property:
    name: str
    about: str  # what holds, in words
    violation: Callable[[Model], str | None]  # None: holds; else where and how it does not
    fix: str = ""  # what to do when a required property fails; {pass} is the pass that needs it


def _quantized(lin) -> bool:
    return isinstance(lin.weight, QuantWeight)


def _float_attention(m: Model) -> str | None:
    for i, b in enumerate(m.blocks):
        a = b.attn
        if any(lin is not None and _quantized(lin) for lin in (a.q, a.k, a.v, a.qkv, a.o)):
            return f"blocks.{i}.attn has quantized projections"
    return None


def _moe_depths(m: Model) -> list[int]:
    return [d for d in range(m.n_layers) if isinstance(m.block_at(d).ffn, MoE)]


def _has_moe(m: Model) -> str | None:
    if _moe_depths(m):
        return None
    return f"this {m.family} model is dense (no layer routes to experts)"


def _moe_single_depth(m: Model) -> str | None:
    seen: dict[int, int] = {}
    for d in _moe_depths(m):
        bi = m.layers[d]
        if bi in seen:
            return (f"MoE block {bi} runs at depths {seen[bi]} and {d}, so its routing statistics "
                    "would be ambiguous")
        seen[bi] = d
    return None


def _quantized_linears(m: Model) -> str | None:
    for path, lin in block_linears(m):
        if not _quantized(lin):
            return f"{path} is float"
    return None


def _float_weights(m: Model) -> str | None:
    return next((f"{path} is already quantized" for path, w in named_weights(m) if isinstance(w, QuantWeight)),
                None)


def _untied_head(m: Model) -> str | None:
    return "lm_head is tied to embed" if m.lm_head is None else None


def _quantized_head(m: Model) -> str | None:
    if m.lm_head is None:
        return "lm_head is tied to embed"
    return None if _quantized(m.lm_head) else "lm_head is float"


def _quantized_embed(m: Model) -> str | None:
    return None if isinstance(m.embed, QuantWeight) else "embed is float"


def _mlps(m: Model):
    for i, b in enumerate(m.blocks):
        if isinstance(b.ffn, MoE):
            for e, ex in enumerate(b.ffn.experts):
                yield f"blocks.{i}.ffn.experts.{e}", ex
            if b.ffn.shared is not None:
                yield f"blocks.{i}.ffn.shared", b.ffn.shared
        else:
            yield f"blocks.{i}.ffn", b.ffn


# fuse/split leave quantized projections as they are, so these speak of float ones only
def _fused_qkv(m: Model) -> str | None:
    for i, b in enumerate(m.blocks):
        a = b.attn
        if not a.fused and not any(_quantized(lin) for lin in (a.q, a.k, a.v)):
            return f"blocks.{i}.attn has separate float q/k/v"
    return None


def _fused_gate_up(m: Model) -> str | None:
    for path, mlp in _mlps(m):
        if not mlp.fused and not any(_quantized(lin) for lin in (mlp.gate, mlp.up)):
            return f"{path} has separate float gate/up"
    return None


def _split_qkv(m: Model) -> str | None:
    for i, b in enumerate(m.blocks):
        if b.attn.fused and not _quantized(b.attn.qkv):
            return f"blocks.{i}.attn has a fused float qkv"
    return None


def _split_gate_up(m: Model) -> str | None:
    for path, mlp in _mlps(m):
        if mlp.fused and not _quantized(mlp.gate_up):
            return f"{path} has a fused float gate_up"
    return None


def _offload_planned(m: Model) -> str | None:
    for d in _moe_depths(m):
        if m.block_at(d).ffn.offload is None:
            return f"the MoE at depth {d} has no offload plan"
    return None


PROPERTIES: dict[str, Property] = {p.name: p for p in (
    Property("float_attention", "float attention projections", _float_attention,
             "run {pass} before quantization"),
    Property("float_weights", "float weights everywhere (none quantized yet)", _float_weights,
             "run {pass} before quant.rtn/awq/gptq"),
    Property("has_moe", "a mixture-of-experts model", _has_moe,
             "compile an MoE checkpoint, or leave out {pass}"),
    Property("moe_single_depth", "every MoE block at one depth only", _moe_single_depth,
             "run {pass} before sharing layers"),
    Property("quantized_linears", "every block projection quantized (routers aside)", _quantized_linears,
             "run a quant.* pass before {pass}"),
    Property("untied_head", "an output head of its own", _untied_head,
             "run canon.untie_embeddings before {pass}"),
    Property("quantized_head", "a quantized output head", _quantized_head,
             "quantize the head (head_bits=) before {pass}"),
    Property("quantized_embed", "a quantized embedding table", _quantized_embed,
             "quantize the embedding (embed_bits=) before {pass}"),
    Property("fused_qkv", "float q/k/v fused into one qkv", _fused_qkv,
             "run canon.fuse_projections before {pass}"),
    Property("fused_gate_up", "float gate/up fused into one gate_up", _fused_gate_up,
             "run canon.fuse_projections before {pass}"),
    Property("split_qkv", "float qkv split into q, k and v", _split_qkv,
             "run canon.split_projections before {pass}"),
    Property("split_gate_up", "float gate_up split into gate and up", _split_gate_up,
             "run canon.split_projections before {pass}"),
    Property("offload_planned", "an expert-offload plan on every MoE", _offload_planned,
             "run moe.offload before {pass}"),
)}


def unknown(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if n not in PROPERTIES]


def first_violation(ir: Model, names: tuple[str, ...]) -> tuple[Property, str] | None:
    """The first of `names` that does not hold on `ir`, with where it fails."""
    for n in names:
        why = PROPERTIES[n].violation(ir)
        if why is not None:
            return PROPERTIES[n], why
    return None
