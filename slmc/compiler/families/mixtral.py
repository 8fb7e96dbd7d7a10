"""Mixtral: Mistral attention (optional sliding window on every layer) with a top-k routed
mixture of SwiGLU experts on every layer: softmax over all experts, keep the top k, and
renormalise their weights to sum to one.

Checkpoints come in two layouts: the original per-expert `block_sparse_moe.experts.{e}.w1/w3/w2`
(what the Hub holds and what transformers' save_pretrained writes by default) and transformers
5's in-memory layout, `mlp.experts.gate_up_proj` [experts, 2*inter, hidden] and
`mlp.experts.down_proj` [experts, hidden, inter] (save_pretrained(save_original_format=False)).
Both are read; the fused one is cut into per-expert weights lazily."""

from .base import LLAMA_STYLE_NAMES, Family, layer_windows, llama_like, register, req, with_defaults

DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False,
            "sliding_window": None, "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2}

_MOE = "model.layers.{i}.block_sparse_moe"
NAMES = {
    **{k: v for k, v in LLAMA_STYLE_NAMES.items() if k not in ("gate", "up", "down")},
    "router": (_MOE + ".gate", "model.layers.{i}.mlp.gate"),
    "expert_gate": _MOE + ".experts.{e}.w1",
    "expert_up": _MOE + ".experts.{e}.w3",
    "expert_down": _MOE + ".experts.{e}.w2",
    "experts_gate_up": "model.layers.{i}.mlp.experts.gate_up_proj",
    "experts_down": "model.layers.{i}.mlp.experts.down_proj",
}


def normalize(cfg: dict):
    cfg = with_defaults(cfg, DEFAULTS)
    n = req(cfg, "num_hidden_layers")
    return llama_like(cfg, n_experts=int(cfg["num_local_experts"]), top_k=int(cfg["num_experts_per_tok"]),
                      norm_topk_prob=True, sliding_window=layer_windows({}, n, cfg.get("sliding_window")))


def tiny_config() -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": 8,
        "num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }


FAMILY = register(Family("mixtral", ("MixtralForCausalLM",), normalize, NAMES, tiny_config))
