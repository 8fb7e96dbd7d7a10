"""Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text): Gemma 2's layout plus per-head
q/k RMSNorm, no attention soft-capping (transformers never applies it), and two RoPEs: local
(sliding) layers use `rope_local_base_freq` unscaled, global layers use `rope_theta` and
`rope_scaling` (transformers 5: `rope_parameters` keyed by layer type). Every 6th layer is
global unless `layer_types` (or `sliding_window_pattern`) says otherwise."""

from .base import Family, layer_windows, register, req, rope_of, with_defaults
from .gemma2 import NAMES, gemma_common

DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "tie_word_embeddings": True,
            "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "final_logit_softcapping": None, "attention_bias": False,
            "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6}


def _ropes(cfg: dict) -> dict[str, tuple[float, dict | None]]:
    p = cfg.get("rope_parameters")
    if isinstance(p, dict) and "full_attention" in p:
        return {t: rope_of(cfg, t) for t in ("full_attention", "sliding_attention")}
    return {"full_attention": rope_of(cfg), "sliding_attention": (float(cfg["rope_local_base_freq"]), None)}


def normalize(cfg: dict):
    cfg = with_defaults(cfg, DEFAULTS)
    n, pattern = req(cfg, "num_hidden_layers"), cfg["sliding_window_pattern"]
    old_rule = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    layer_windows(cfg, n, 1, old_rule)  # validates layer_types before they pick the RoPEs
    types = cfg.get("layer_types") or old_rule
    ropes = _ropes(cfg)
    return gemma_common(
        cfg, old_rule, qk_norm=True, attn_softcap=None,
        rope_theta=ropes["full_attention"][0], rope_scaling=ropes["full_attention"][1],
        rope_theta_per_layer=[ropes[t][0] for t in types],
        rope_scaling_per_layer=[ropes[t][1] for t in types],
    )


def tiny_config() -> dict:
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 16,
        "sliding_window": 8, "final_logit_softcapping": 3.0, "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        },
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
    }


FAMILY = register(Family("gemma3", ("Gemma3ForCausalLM",), normalize, NAMES, tiny_config))
