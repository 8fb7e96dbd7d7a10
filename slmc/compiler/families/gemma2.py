"""Gemma 2: RMSNorm with (1 + w) weights, embeddings scaled by sqrt(hidden), "sandwich" norms
around attention and MLP, tanh soft-capping of attention scores and final logits, attention
scaled by query_pre_attn_scalar^-0.5, local (sliding) and global layers alternating (even
layers slide unless `layer_types` says otherwise), GeGLU with tanh-approximate GELU."""

from ...errors import UnsupportedError
from .base import LLAMA_STYLE_NAMES, Family, layer_windows, llama_like, register, req, with_defaults

DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "tie_word_embeddings": True,
            "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
            "attention_bias": False}

NAMES = {
    **LLAMA_STYLE_NAMES,
    "ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
    "post_attn_norm": "model.layers.{i}.post_attention_layernorm",
    "post_ffn_norm": "model.layers.{i}.post_feedforward_layernorm",
}


def gemma_common(cfg: dict, default_types: list[str], **overrides):
    """What Gemma 2 and Gemma 3 share."""
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedError("bidirectional (non-causal) attention is not supported",
                               "config.json.use_bidirectional_attention")
    n = req(cfg, "num_hidden_layers")
    bias = bool(cfg["attention_bias"])
    base = dict(
        act="gelu_tanh", norm_unit_offset=True, sandwich_norms=True,
        embed_scale=float(req(cfg, "hidden_size")) ** 0.5,
        attn_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5,
        final_softcap=cfg.get("final_logit_softcapping"),
        sliding_window=layer_windows(cfg, n, cfg.get("sliding_window"), default_types),
        qkv_bias=bias, o_bias=bias,
    )
    return llama_like(cfg, **{**base, **overrides})


def normalize(cfg: dict):
    cfg = with_defaults(cfg, DEFAULTS)
    n = req(cfg, "num_hidden_layers")
    old_rule = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return gemma_common(cfg, old_rule, attn_softcap=cfg.get("attn_logit_softcapping"))


def tiny_config() -> dict:
    return {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "query_pre_attn_scalar": 24, "sliding_window": 8, "attn_logit_softcapping": 1.5,
        "final_logit_softcapping": 2.0, "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    }


FAMILY = register(Family("gemma2", ("Gemma2ForCausalLM",), normalize, NAMES, tiny_config))
