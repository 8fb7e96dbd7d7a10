"""Qwen2-MoE (Qwen1.5-MoE): Qwen2 attention (q/k/v bias unless `qkv_bias` is false) with top-k
routed SwiGLU experts (softmax, top k, renormalised only if `norm_topk_prob`) plus an always-on
shared expert scaled by sigmoid(shared_expert_gate(x)). Layer i is sparse when it is not in
`mlp_only_layers` and (i + 1) % decoder_sparse_step == 0; other layers use a dense MLP.

Experts are read per-expert (`mlp.experts.{e}.gate_proj/up_proj/down_proj`, the Hub layout and
save_pretrained's default) or fused (`mlp.experts.gate_up_proj`/`down_proj`, transformers 5)."""

from .base import LLAMA_STYLE_NAMES, Family, layer_windows, llama_like, register, req, with_defaults

DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
            "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
            "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
            "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "qkv_bias": True}

_MLP = "model.layers.{i}.mlp"
NAMES = {
    **LLAMA_STYLE_NAMES,
    "router": _MLP + ".gate",
    "expert_gate": _MLP + ".experts.{e}.gate_proj",
    "expert_up": _MLP + ".experts.{e}.up_proj",
    "expert_down": _MLP + ".experts.{e}.down_proj",
    "experts_gate_up": _MLP + ".experts.gate_up_proj",
    "experts_down": _MLP + ".experts.down_proj",
    "shared_gate": _MLP + ".shared_expert.gate_proj",
    "shared_up": _MLP + ".shared_expert.up_proj",
    "shared_down": _MLP + ".shared_expert.down_proj",
    "shared_expert_gate": _MLP + ".shared_expert_gate",
}


def normalize(cfg: dict):
    cfg = with_defaults(cfg, DEFAULTS)
    n, step = req(cfg, "num_hidden_layers"), int(cfg["decoder_sparse_step"])
    n_experts = int(cfg["num_experts"])
    dense = set(cfg.get("mlp_only_layers") or [])
    sparse = [n_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(n)]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    old_rule = ["sliding_attention" if i % 2 == 0 and i < cfg["max_window_layers"] else "full_attention"
                for i in range(n)]
    return llama_like(
        cfg, qkv_bias=bool(cfg["qkv_bias"]), n_experts=n_experts, top_k=int(cfg["num_experts_per_tok"]),
        norm_topk_prob=bool(cfg["norm_topk_prob"]), moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        shared_expert_size=int(cfg["shared_expert_intermediate_size"] or 0) or None, sparse_layers=sparse,
        sliding_window=layer_windows(cfg, n, window, old_rule))


def tiny_config() -> dict:
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [1], "use_sliding_window": True,
        "sliding_window": 8, "max_window_layers": 2, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }


FAMILY = register(Family("qwen2_moe", ("Qwen2MoeForCausalLM",), normalize, NAMES, tiny_config))
