"""Qwen3 (dense): Qwen2's layout plus per-head RMSNorm on q and k before RoPE, an explicit
head_dim, and `attention_bias` on q/k/v/o (off in released models)."""

from .base import LLAMA_STYLE_NAMES, Family, llama_like, register, with_defaults
from .qwen2 import qwen_windows

DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
            "head_dim": 128, "attention_bias": False, "use_sliding_window": False,
            "sliding_window": 4096, "max_window_layers": 28}


def normalize(cfg: dict):
    cfg = with_defaults(cfg, DEFAULTS)
    bias = bool(cfg["attention_bias"])
    return llama_like(cfg, qk_norm=True, qkv_bias=bias, o_bias=bias, sliding_window=qwen_windows(cfg))


def tiny_config() -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,  # != hidden / heads
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "bos_token_id": 1, "eos_token_id": [2, 3],
    }


FAMILY = register(Family("qwen3", ("Qwen3ForCausalLM",), normalize, LLAMA_STYLE_NAMES, tiny_config))
