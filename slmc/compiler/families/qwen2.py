"""Qwen2 / Qwen2.5: Llama plus q/k/v bias (o_proj has none); optional sliding window on the
layers at or above `max_window_layers` when `use_sliding_window` is set."""

from .base import LLAMA_STYLE_NAMES, Family, layer_windows, llama_like, register, req, with_defaults

DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
            "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}


def qwen_windows(cfg: dict) -> list[int | None] | None:
    """Qwen2/Qwen3 rule: `layer_types` if given, else sliding from `max_window_layers` upwards."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    n = req(cfg, "num_hidden_layers")
    default = ["sliding_attention" if i >= cfg["max_window_layers"] else "full_attention" for i in range(n)]
    return layer_windows(cfg, n, window, default)


def normalize(cfg: dict):
    cfg = with_defaults(cfg, DEFAULTS)
    return llama_like(cfg, qkv_bias=True, sliding_window=qwen_windows(cfg))


def tiny_config() -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
        "bos_token_id": 1, "eos_token_id": 2,
    }


FAMILY = register(Family("qwen2", ("Qwen2ForCausalLM",), normalize, LLAMA_STYLE_NAMES, tiny_config))
