"""What the benchmarks use beyond the CLI's jobs: token ids, IR measures, building blocks
for IR made in a script (the MoE upcycle), and the MoE offload runner."""

from __future__ import annotations

from pathlib import Path

from ..compiler.ir import MLP, Linear, Model, MoE, QuantWeight, Weight, named_weights, param_count, weight_bytes
from ..compiler.serialize import save_ir
from ..compiler.textdata import token_ids
from ..targets.executorch.moe_runner import ExpertCache, MoEOffloadSession, after_layer, serve_layer

__all__ = ["MLP", "Linear", "Model", "MoE", "QuantWeight", "Weight", "named_weights", "param_count", "weight_bytes",
           "save_ir", "token_ids", "kv_bytes_per_token", "ffn_inputs", "tiny_llama_config", "expert_routes",
           "moe_session", "ExpertCache", "serve_layer", "after_layer"]


def kv_bytes_per_token(model: Model) -> int:
    """K and V bytes one token adds to the cache, over all layers (at the KV spec's dtype)."""
    from ..passes.arch_gqa import kv_bytes_per_token as count

    return count(model)


def ffn_inputs(model: Model, ids) -> list:
    """Each block's normalized FFN input on token ids [B, T] (reference executor, fp32), in
    the order of `model.blocks`: what a router sees."""
    import torch

    from ..compiler import reference as R

    pos = torch.arange(ids.shape[1])
    out = []
    with torch.no_grad():
        x = R.embed(model, ids)
        for b in model.blocks:
            x = x + R.attention(b.attn, R.rms_norm(x, b.attn_norm), pos)
            n = R.rms_norm(x, b.ffn_norm)
            x = x + R.mlp(b.ffn, n)
            out.append(n)
    return out


def tiny_llama_config() -> dict:
    """The Hugging Face config of the tiny random Llama the tests and `--quick` runs use."""
    from ..compiler.families.llama import tiny_config

    return tiny_config()


def expert_routes(model: Model, ids, chunk: int = 8) -> dict:
    """Per MoE depth, the experts each token of ids [N, T] routes to (reference executor)."""
    from ..passes.moe_offload import expert_routes as routes

    return routes(model, ids, chunk)


def moe_session(folder: str | Path, manifest: dict, cache_experts: int | None = None, predict: bool = True):
    """slmc's runner for an ExecuTorch expert-offload artifact: step(tokens, start) -> logits."""
    return MoEOffloadSession(Path(folder), manifest, cache_experts=cache_experts, predict=predict)
