"""What a family is: config normalisation plus a weight-name table, as data.

A family module turns a Hugging Face config.json dict into an `ArchConfig` (one
vocabulary of fields for every decoder) and gives `NAMES`, the HF tensor name of
each IR role. `build_model` does the rest for every family alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ...errors import SlmcError, UnsupportedError
from ..ir import MLP, Attention, Block, KVCacheSpec, Linear, Model, MoE, Norm, RoPE, Weight


@dataclass
class ArchConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    max_position: int
    rope_theta: float
    rope_scaling: dict | None = None
    rotary_dim: int | None = None  # default: head_dim
    act: str = "silu"
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    embed_scale: float = 1.0
    attn_scale: float | None = None  # default head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: list[int | None] | None = None  # per layer
    rope_theta_per_layer: list[float] | None = None  # Gemma 3 local/global rope
    rope_scaling_per_layer: list[dict | None] | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # mixture of experts
    n_experts: int = 0
    top_k: int = 0
    norm_topk_prob: bool = True
    moe_intermediate_size: int | None = None
    shared_expert_size: int | None = None
    sparse_layers: list[bool] | None = None  # which layers use the MoE ffn
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)


class TensorSource(Protocol):
    """Where weights come from: names to lazily-loaded tensors."""

    def has(self, name: str) -> bool: ...

    def weight(self, name: str) -> Weight: ...

    def describe(self, name: str) -> str: ...


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    normalize: Callable[[dict], ArchConfig]
    names: dict[str, str | tuple[str, ...]]  # role -> HF name (or alternatives, first present wins)
    tiny_config: Callable[[], dict]  # a tiny random HF config.json dict, for tests


FAMILIES: dict[str, Family] = {}
_BY_ARCH: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    for a in family.architectures:
        _BY_ARCH[a] = family
    return family


def supported_architectures() -> list[str]:
    from . import load_all

    load_all()
    return sorted(_BY_ARCH)


def family_for(cfg: dict, where: str) -> Family:
    archs = cfg.get("architectures") or []
    supported = supported_architectures()
    for a in archs:
        if a in _BY_ARCH:
            return _BY_ARCH[a]
    if not archs and cfg.get("model_type"):
        # transformers' AutoModelForCausalLM loads such a folder by model_type; so does slmc,
        # by the model_type each family's own config declares
        for fam in FAMILIES.values():
            if fam.tiny_config().get("model_type") == cfg["model_type"]:
                return fam
    if cfg.get("auto_map"):
        raise UnsupportedError(
            "this model needs trust_remote_code (custom code in auto_map); slmc never runs "
            f"remote code. Supported architectures: {', '.join(supported)}", where)
    got = ", ".join(archs) if archs else f"none given; model_type {cfg.get('model_type')!r}"
    raise UnsupportedError(
        f"unsupported architecture ({got}); supported: {', '.join(supported)}", where + ".architectures")


def req(cfg: dict, key: str, where: str = "config.json"):
    if key not in cfg or cfg[key] is None:
        raise SlmcError(f"missing required field {key!r}", where)
    return cfg[key]


def rope_of(cfg: dict, layer_type: str | None = None) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers-5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` fields."""
    p = cfg.get("rope_parameters")
    if isinstance(p, dict) and layer_type and layer_type in p:
        p = p[layer_type]
    if isinstance(p, dict) and "rope_theta" in p:
        theta, scaling = p["rope_theta"], dict(p)
    else:
        theta, scaling = cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling")
        scaling = dict(scaling) if scaling else None
    if scaling:
        scaling.pop("rope_theta", None)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = kind
        if kind not in ("default", "linear", "llama3"):
            raise UnsupportedError(f"rope scaling {kind!r} is not supported (default, linear, llama3 are)",
                                   "config.json.rope_scaling")
        if kind == "default":
            scaling = None
    return float(theta), scaling


def with_defaults(cfg: dict, defaults: dict) -> dict:
    """`cfg` with the HF config class's defaults filled in for absent keys (None stays None)."""
    return {**defaults, **cfg}


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(cfg: dict, n_layers: int, window: int | None,
                  default_types: list[str] | None = None) -> list[int | None] | None:
    """Per-layer sliding windows from `layer_types` (transformers 5), else `default_types`
    (the family's older rule), else every layer; None when no layer slides."""
    if not window:
        return None
    types = cfg.get("layer_types") or default_types or ["sliding_attention"] * n_layers
    if len(types) != n_layers:
        raise SlmcError(f"layer_types has {len(types)} entries for {n_layers} layers",
                        "config.json.layer_types")
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad:
        raise UnsupportedError(
            f"layer type(s) {', '.join(bad)} are not supported ({', '.join(LAYER_TYPES)} are)",
            "config.json.layer_types")
    out = [int(window) if t == "sliding_attention" else None for t in types]
    return out if any(w is not None for w in out) else None


def eos_list(cfg: dict) -> list[int]:
    e = cfg.get("eos_token_id")
    if e is None:
        return []
    return [int(x) for x in (e if isinstance(e, list) else [e])]


# ---------------------------------------------------------------- the generic builder


def _expect(src: TensorSource, name: str, shape: tuple[int, ...]) -> Weight:
    if not src.has(name):
        raise SlmcError(f"tensor {name!r} is missing from the checkpoint", src.describe(name))
    w = src.weight(name)
    if tuple(w.shape) != tuple(shape):
        raise SlmcError(f"tensor {name!r} has shape {list(w.shape)} but the config implies {list(shape)}",
                        src.describe(name))
    return w


def _name(src, names, role, fmt, suffix: str = "") -> str:
    """The tensor name of `role`. A role may list alternative names (checkpoints written by
    different tools); the first present in the checkpoint wins."""
    alts = names[role] if isinstance(names[role], (tuple, list)) else (names[role],)
    cands = [a.format(**fmt) + suffix for a in alts]
    return next((n for n in cands if src.has(n)), cands[0])


def _linear(src, names, role, fmt, out, inp, bias=False) -> Linear:
    base = _name(src, names, role, fmt, ".weight")[: -len(".weight")]
    b = _expect(src, base + ".bias", (out,)) if bias else None
    return Linear(_expect(src, base + ".weight", (out, inp)), b)


def _norm(src, names, role, fmt, dim, c: ArchConfig) -> Norm:
    return Norm(_expect(src, _name(src, names, role, fmt, ".weight"), (dim,)), c.rms_eps, c.norm_unit_offset)


class _Rows:
    """Per-expert 2-D Weights cut from one fused [experts, rows, cols] tensor (transformers 5's
    `mlp.experts.gate_up_proj` layout), loaded lazily: the fused tensor is read on the first
    expert's use, each expert copies out its slice, and the fused tensor is dropped once every
    expert has taken its slice, so peak memory stays one fused tensor deep."""

    def __init__(self, fused: Weight):
        self.fused = fused
        self.pending = set(range(fused.shape[0]))

    def weight(self, e: int) -> Weight:
        return Weight(shape=self.fused.shape[1:], dtype=self.fused.dtype, loader=lambda: self._take(e))

    def _take(self, e: int) -> torch.Tensor:
        t = self.fused.data[e].clone()
        self.pending.discard(e)
        if not self.pending:
            self.fused.release()
            self.pending = set(range(self.fused.shape[0]))
        return t


def _mlp(src, names, prefix, fmt, h, inter, c: ArchConfig) -> MLP:
    if c.fused_gate_up:
        return MLP(down=_linear(src, names, prefix + "down", fmt, h, inter), act=c.act,
                   gate_up=_linear(src, names, prefix + "gate_up", fmt, 2 * inter, h))
    return MLP(down=_linear(src, names, prefix + "down", fmt, h, inter), act=c.act,
               gate=_linear(src, names, prefix + "gate", fmt, inter, h),
               up=_linear(src, names, prefix + "up", fmt, inter, h))


def _attention(src, names, fmt, i, c: ArchConfig) -> Attention:
    h, hd = c.hidden_size, c.head_dim
    nq, nkv = c.n_heads * hd, c.n_kv_heads * hd
    theta = c.rope_theta_per_layer[i] if c.rope_theta_per_layer else c.rope_theta
    scaling = c.rope_scaling_per_layer[i] if c.rope_scaling_per_layer else c.rope_scaling
    a = Attention(
        n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=hd,
        o=_linear(src, names, "o", fmt, h, nq, c.o_bias),
        rope=RoPE(theta, c.rotary_dim or hd, scaling),
        scale=c.attn_scale if c.attn_scale is not None else hd ** -0.5,
        sliding_window=c.sliding_window[i] if c.sliding_window else None,
        logit_softcap=c.attn_softcap,
    )
    if c.fused_qkv:
        a.qkv = _linear(src, names, "qkv", fmt, nq + 2 * nkv, h, c.qkv_bias)
    else:
        a.q = _linear(src, names, "q", fmt, nq, h, c.qkv_bias)
        a.k = _linear(src, names, "k", fmt, nkv, h, c.qkv_bias)
        a.v = _linear(src, names, "v", fmt, nkv, h, c.qkv_bias)
    if c.qk_norm:
        a.q_norm = _norm(src, names, "q_norm", fmt, hd, c)
        a.k_norm = _norm(src, names, "k_norm", fmt, hd, c)
    return a


def _ffn(src, names, fmt, i, c: ArchConfig):
    h = c.hidden_size
    if not c.n_experts or (c.sparse_layers and not c.sparse_layers[i]):
        return _mlp(src, names, "", fmt, h, c.intermediate_size, c)
    inter, n = c.moe_intermediate_size or c.intermediate_size, c.n_experts
    if "experts_gate_up" in names and src.has(_name(src, names, "experts_gate_up", fmt)):
        gu = _Rows(_expect(src, _name(src, names, "experts_gate_up", fmt), (n, 2 * inter, h)))
        dn = _Rows(_expect(src, _name(src, names, "experts_down", fmt), (n, h, inter)))
        experts = [MLP(down=Linear(dn.weight(e)), act=c.act, gate_up=Linear(gu.weight(e))) for e in range(n)]
    else:
        experts = [_mlp(src, names, "expert_", {**fmt, "e": e}, h, inter, c) for e in range(n)]
    m = MoE(router=_linear(src, names, "router", fmt, n, h), experts=experts,
            top_k=c.top_k, norm_topk_prob=c.norm_topk_prob)
    if c.shared_expert_size:
        m.shared = _mlp(src, names, "shared_", fmt, h, c.shared_expert_size, c)
        m.shared_gate = _linear(src, names, "shared_expert_gate", fmt, 1, h)
    return m


def build_model(family: Family, c: ArchConfig, src: TensorSource, max_seq_len: int | None,
                source: dict) -> Model:
    names, h = family.names, c.hidden_size
    blocks = []
    for i in range(c.n_layers):
        fmt = {"i": i}
        blocks.append(Block(
            attn_norm=_norm(src, names, "attn_norm", fmt, h, c),
            attn=_attention(src, names, fmt, i, c),
            ffn_norm=_norm(src, names, "ffn_norm", fmt, h, c),
            ffn=_ffn(src, names, fmt, i, c),
            post_attn_norm=_norm(src, names, "post_attn_norm", fmt, h, c) if c.sandwich_norms else None,
            post_ffn_norm=_norm(src, names, "post_ffn_norm", fmt, h, c) if c.sandwich_norms else None,
        ))
    embed = _expect(src, _name(src, names, "embed", {}), (c.vocab_size, h))
    lm_head = None
    if not c.tie_embeddings:
        lm_head = Linear(_expect(src, _name(src, names, "lm_head", {}), (c.vocab_size, h)))
    max_len = max_seq_len or min(c.max_position, 2048)
    return Model(
        family=family.name, architecture=family.architectures[0], vocab_size=c.vocab_size,
        hidden_size=h, embed=embed, blocks=blocks, layers=list(range(c.n_layers)),
        final_norm=Norm(_expect(src, _name(src, names, "final_norm", {}), (h,)), c.rms_eps,
                        c.norm_unit_offset),
        kv=KVCacheSpec(max_len=max_len), max_position=c.max_position, lm_head=lm_head,
        embed_scale=c.embed_scale, final_logit_softcap=c.final_softcap,
        bos_id=c.bos_id, eos_ids=list(c.eos_ids), source=source,
    )


LLAMA_STYLE_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "q": "model.layers.{i}.self_attn.q_proj",
    "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj",
    "o": "model.layers.{i}.self_attn.o_proj",
    "q_norm": "model.layers.{i}.self_attn.q_norm",
    "k_norm": "model.layers.{i}.self_attn.k_norm",
    "gate": "model.layers.{i}.mlp.gate_proj",
    "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
}


def llama_like(cfg: dict, **overrides) -> ArchConfig:
    """Normalise the fields that Llama-descended configs share."""
    n_heads = req(cfg, "num_attention_heads")
    hidden = req(cfg, "hidden_size")
    theta, scaling = rope_of(cfg)
    head_dim = cfg.get("head_dim") or hidden // n_heads
    base = dict(
        vocab_size=req(cfg, "vocab_size"), hidden_size=hidden, n_layers=req(cfg, "num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim,
        intermediate_size=req(cfg, "intermediate_size"), rms_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position=cfg.get("max_position_embeddings", 2048), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_id=cfg.get("bos_token_id"), eos_ids=eos_list(cfg),
    )
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
    base["act"] = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh", "gelu": "gelu"}.get(act, act)
    base.update(overrides)
    return ArchConfig(**base)


def to_float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()
