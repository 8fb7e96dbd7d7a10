"""Phi-3 / Phi-3.5 / Phi-4-mini text: Llama with fused qkv_proj and gate_up_proj, optional
partial rotary (`partial_rotary_factor`) and an optional sliding window over every layer.
The long-context variants' LongRoPE ("longrope", formerly "su"/"yarn") is refused."""

from ...errors import UnsupportedError
from .base import LLAMA_STYLE_NAMES, Family, layer_windows, llama_like, register, req, with_defaults

DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "sliding_window": None}

NAMES = {k: v for k, v in LLAMA_STYLE_NAMES.items() if k not in ("q", "k", "v", "gate", "up")}
NAMES |= {"qkv": "model.layers.{i}.self_attn.qkv_proj", "gate_up": "model.layers.{i}.mlp.gate_up_proj"}

LONG_ROPE = ("longrope", "su", "yarn")  # transformers maps all three to its LongRoPE


def _rope_dict(cfg: dict) -> dict:
    p = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else None
    return p or cfg.get("rope_scaling") or {}


def normalize(cfg: dict):
    cfg = with_defaults(cfg, DEFAULTS)
    rope = _rope_dict(cfg)
    kind = rope.get("rope_type", rope.get("type"))
    if kind in LONG_ROPE:
        raise UnsupportedError(
            f"Phi-3 long-context RoPE scaling ({kind!r}, the 128k-context variants) is not supported; "
            "use a short-context variant (e.g. Phi-3-mini-4k-instruct)", "config.json.rope_scaling")
    c = llama_like(cfg, fused_qkv=True, fused_gate_up=True,
                   sliding_window=layer_windows({}, req(cfg, "num_hidden_layers"), cfg.get("sliding_window")))
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        c.rotary_dim = int(c.head_dim * factor)
    if c.rope_scaling:
        c.rope_scaling.pop("partial_rotary_factor", None)
    return c


def tiny_config() -> dict:
    return {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "original_max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        "sliding_window": 8, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0,
    }


FAMILY = register(Family("phi3", ("Phi3ForCausalLM",), normalize, NAMES, tiny_config))
