"""Llama (and SmolLM, which is Llama): RMSNorm, GQA, RoPE, SwiGLU."""

from ...errors import UnsupportedError
from .base import LLAMA_STYLE_NAMES, Family, llama_like, register


def normalize(cfg: dict):
    if cfg.get("mlp_bias"):
        raise UnsupportedError("Llama with mlp_bias=true is not supported", "config.json.mlp_bias")
    bias = bool(cfg.get("attention_bias", False))  # on q/k/v and o alike in transformers' Llama
    return llama_like(cfg, qkv_bias=bias, o_bias=bias)


def tiny_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2,
    }


FAMILY = register(Family("llama", ("LlamaForCausalLM",), normalize, LLAMA_STYLE_NAMES, tiny_config))
