"""Mistral: Llama with an optional sliding window over every layer (`sliding_window`; null in
v0.2 and later). transformers' Mistral ignores `layer_types`, and so does this family."""

from .base import LLAMA_STYLE_NAMES, Family, layer_windows, llama_like, register, req, with_defaults

DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False,
            "sliding_window": 4096}


def normalize(cfg: dict):
    cfg = with_defaults(cfg, DEFAULTS)
    windows = layer_windows({}, req(cfg, "num_hidden_layers"), cfg.get("sliding_window"))  # every layer
    return llama_like(cfg, sliding_window=windows)


def tiny_config() -> dict:
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24,  # explicit, as in Nemo
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "sliding_window": 8, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }


FAMILY = register(Family("mistral", ("MistralForCausalLM",), normalize, LLAMA_STYLE_NAMES, tiny_config))
