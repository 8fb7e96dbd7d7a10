"""moe.offload: EdgeMoE-style expert offload plan (dense backbone + experts loaded on demand).

1. Expert-wise bit widths: routed experts' linears at `expert_bits`, every other block
   linear (attention, shared experts, dense MLPs) at `backbone_bits`, both RTN with
   `group_size` (0 keeps float; routers and gates always stay float: routing is sensitive).
2. Expert-activation statistics on calibration data (your text via calib=FILE;FILE, else
   data-free samples, see compiler/calib.py), run through the model *after* step 1 so
   they describe the routing the artifact will do: per MoE depth the frequency of each
   expert, and the transition table P(expert e' at the next MoE depth | expert e here),
   counted over every (routed e, routed e') pair of each token, rows normalised to 1
   (a row never seen is uniform).
3. The plan lands on each MoE as `offload` (ExpertOffload): cache_experts = K routed
   experts resident at once, over all MoE layers together (a phone's budget is one
   number, not one per layer), so K must be at least top_k.

Before:                                   After (defaults: 4-bit experts, float backbone, K=8):
  moe: experts=4 top_k=2 router f32[4,64]   moe: experts=4 top_k=2 router f32[4,64]
    expert0(silu): gate f32[96,64] ...        expert0(silu): gate sint4g32[96,64](rtn,act int8) ...
                                              offload: cache_experts=8 expert_bits=4 freq=[...]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler import reference
from ..compiler.ir import ExpertOffload, Model, MoE, QuantWeight, block_linears
from ..compiler.pass_manager import Pass, PassResult, register
from ..compiler.quant import QuantScheme, rtn
from ..errors import SlmcError
from ._options import CalibOptions

WHERE = "--pass moe.offload"


@dataclass(frozen=True)
class OffloadOptions(CalibOptions):
    expert_bits: int = 4  # 0: float experts
    backbone_bits: int = 0  # 0: float attention / shared / dense MLPs; 4 or 8
    group_size: int = 32
    backbone_group_size: int = 0  # 0: group_size; = in_features: per channel (XNNPACK's 8-bit kernels)
    symmetric: bool = True
    # The defaults fit ExecuTorch/XNNPACK's 8da4w kernels: int8 per-token activations
    # into quantized linears, scales that are exact in its bf16 storage.
    act_bits: int = 8  # 0: float activations
    scale_dtype: str = "bfloat16"  # or float32
    cache_experts: int = 8  # K routed experts resident at once, over all MoE layers
    seq_len: int = 128  # this pass's own default (CalibOptions: 256)


def _moe_depths(ir: Model) -> list[int]:
    return [d for d in range(ir.n_layers) if isinstance(ir.block_at(d).ffn, MoE)]


def _check(ir: Model, o: OffloadOptions) -> list[int]:
    """The options against the model (that it has MoE layers, each at one depth, is `requires`)."""
    depths = _moe_depths(ir)
    top_k = max(ir.block_at(d).ffn.top_k for d in depths)
    if o.cache_experts < top_k:
        raise SlmcError(f"cache_experts={o.cache_experts} is smaller than top_k={top_k}: one token needs "
                        f"{top_k} experts of a layer resident at once", WHERE)
    for name in ("expert_bits", "backbone_bits"):
        if getattr(o, name) not in (0, 4, 8):
            raise SlmcError(f"{name}={getattr(o, name)}: use 0 (float), 4 or 8", WHERE)
    if o.act_bits not in (0, 8):
        raise SlmcError(f"act_bits={o.act_bits}: use 0 (float activations) or 8", WHERE)
    return depths


def _quantize(ir: Model, o: OffloadOptions) -> int:
    done: dict[int, QuantWeight] = {}
    for path, lin in block_linears(ir):
        expert = ".ffn.experts." in path
        bits = o.expert_bits if expert else o.backbone_bits
        if not bits or isinstance(lin.weight, QuantWeight):
            continue
        if id(lin.weight) not in done:  # a weight shared by several depths is quantized once
            g = o.group_size if expert or not o.backbone_group_size else o.backbone_group_size
            s = QuantScheme(bits, g, o.symmetric, o.scale_dtype)
            s.check(lin.in_features, f"{WHERE} ({path})")
            q = rtn(lin.weight.float(), s)
            q.act_bits = o.act_bits
            done[id(lin.weight)] = q
        lin.weight = done[id(lin.weight)]
    return len(done)


def _route(moe: MoE, n: torch.Tensor) -> torch.Tensor:
    """Top-k expert ids [tokens, k] for the normalised FFN input, as reference.moe picks them."""
    probs = torch.softmax(reference.linear(n.reshape(-1, n.shape[-1]), moe.router), dim=-1)
    return probs.topk(moe.top_k, dim=-1).indices


@torch.no_grad()
def expert_routes(ir: Model, ids: torch.Tensor, chunk: int = 8) -> dict[int, torch.Tensor]:
    """{MoE depth: top-k ids [tokens, k]} of every calibration token, in the reference's arithmetic."""
    routes: dict[int, list[torch.Tensor]] = {d: [] for d in _moe_depths(ir)}
    positions = torch.arange(ids.shape[1])
    for i in range(0, ids.shape[0], chunk):
        x = reference.embed(ir, ids[i:i + chunk])
        for d in range(ir.n_layers):
            b = ir.block_at(d)
            if not isinstance(b.ffn, MoE):
                x = reference.block(b, x, positions)
                continue
            h = reference.attention(b.attn, reference.rms_norm(x, b.attn_norm), positions)
            x = x + (reference.rms_norm(h, b.post_attn_norm) if b.post_attn_norm is not None else h)
            n = reference.rms_norm(x, b.ffn_norm)
            routes[d].append(_route(b.ffn, n))
            h = reference.moe(b.ffn, n)
            x = x + (reference.rms_norm(h, b.post_ffn_norm) if b.post_ffn_norm is not None else h)
    return {d: torch.cat(r) for d, r in routes.items()}


def statistics(routes: dict[int, torch.Tensor], n_experts: dict[int, int]) -> tuple[dict, dict, float]:
    """(frequencies per depth, transition table per depth but the last, predictor recall):
    recall = share of next-depth routed experts that the table's top-k guess names."""
    depths = sorted(routes)
    freqs, trans, hits, total = {}, {}, 0, 0
    for d in depths:
        counts = torch.bincount(routes[d].flatten(), minlength=n_experts[d]).double()
        freqs[d] = (counts / counts.sum()).tolist()
    for a, b in zip(depths, depths[1:]):
        ra, rb = routes[a], routes[b]
        one_a = torch.zeros(len(ra), n_experts[a], dtype=torch.float64).scatter_(1, ra, 1.0)
        one_b = torch.zeros(len(rb), n_experts[b], dtype=torch.float64).scatter_(1, rb, 1.0)
        c = one_a.T @ one_b  # [E_a, E_b] co-activation counts
        rows = c.sum(1, keepdim=True)
        t = torch.where(rows > 0, c / rows.clamp_min(1), torch.full_like(c, 1.0 / n_experts[b]))
        trans[a] = t.tolist()
        guess = (one_a @ t).topk(rb.shape[1], dim=-1).indices
        hits += int(one_b.gather(1, guess).sum())
        total += rb.numel()
    return freqs, trans, hits / total if total else float("nan")


@register
class MoEOffload(Pass):
    name = "moe.offload"
    Options = OffloadOptions
    requires = ("has_moe", "moe_single_depth")
    ensures = ("offload_planned",)

    def run(self, ir: Model) -> PassResult:
        o = self.options
        depths = _check(ir, o)
        n_quant = _quantize(ir, o)
        ids, _ = o.tokens(ir)
        routes = expert_routes(ir, ids)
        n_exp = {d: len(ir.block_at(d).ffn.experts) for d in depths}
        freqs, trans, recall = statistics(routes, n_exp)
        for d in depths:
            ir.block_at(d).ffn.offload = ExpertOffload(cache_experts=o.cache_experts, expert_bits=o.expert_bits,
                                                       frequencies=freqs[d], transition=trans.get(d))
        total = sum(n_exp.values())
        return PassResult(ir, True, {
            "moe_layers": len(depths), "routed_experts": total, "cache_experts": min(o.cache_experts, total),
            "quantized": n_quant, "calibration": o.describe(),
            "tokens": int(ids.numel()), "predictor_recall": round(recall, 4)})

