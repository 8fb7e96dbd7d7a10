"""What is estimated: shapes from a config (through the family registry's normalisation, so
no weights are read) and storage from the quantization options a recipe or an artifact's
pipeline carries."""

from __future__ import annotations

from dataclasses import dataclass

from ..compiler.families import family_for, load_all
from ..errors import SlmcError
from .costs import Scheme, Shape, Storage

# Float width each target stores and computes in (Core ML computes in fp16 by default).
FLOAT_BITS = {"executorch": 32, "tflite": 32, "onnx": 32, "coreml": 16}
SCALE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
KV_BITS = {"float32": 32, "float16": 16, "int8": 8}
# Passes that change nothing the cost model sees (storage comes from quant.*, the cache from
# kv.cache); any other pass may change the shapes, and the estimate refuses it.
NEUTRAL = ("canon.", "quant.", "kv.cache")


def shape_of(cfg: dict, where: str) -> Shape:
    """Shapes from a Hugging Face config dict (the family's own normalisation)."""
    load_all()
    fam = family_for(cfg, where)
    try:
        c = fam.normalize(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise SlmcError(f"cannot read {fam.name} config: {e}", where) from None
    return Shape(
        vocab=c.vocab_size, hidden=c.hidden_size, layers=c.n_layers, heads=c.n_heads, kv_heads=c.n_kv_heads,
        head_dim=c.head_dim, intermediate=c.intermediate_size, tied=c.tie_embeddings, qkv_bias=c.qkv_bias,
        o_bias=c.o_bias, qk_norm=c.qk_norm, sandwich_norms=c.sandwich_norms,
        windows=tuple(c.sliding_window or ()), experts=c.n_experts, top_k=c.top_k,
        expert_intermediate=c.moe_intermediate_size or 0, shared_expert=c.shared_expert_size or 0,
        sparse=tuple(c.sparse_layers or ()), max_position=c.max_position)


@dataclass(frozen=True)
class Quant:
    """The options of a quant.* pass that decide storage (QuantOptions' fields)."""

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    embed_bits: int = 0
    head_bits: int = 0
    scale_dtype: str = "float32"
    act_bits: int = 0

    @classmethod
    def from_options(cls, opts: dict) -> Quant:
        return cls(**{k: opts[k] for k in cls.__dataclass_fields__ if k in opts})


def storage_of(target: str, quant: Quant | None, kv_dtype: str, tied: bool = False) -> Storage:
    """How each tensor is stored. The embedding and the head take their own bits in the
    linears' group size (per channel when that does not divide the hidden size), the head with
    the linears' activation quantization; 0 bits: float. tied: the head reads the table, so
    with embed_bits and no head_bits it reads the quantized table (quant passes leave a tied
    head tied unless head_bits gives it its own node)."""
    fb = FLOAT_BITS.get(target, 32)
    flt = Scheme(fb)
    if quant is None:
        return Storage(flt, flt, flt, fb, KV_BITS[kv_dtype])
    sb = SCALE_BYTES.get(quant.scale_dtype, 4)

    def scheme(bits: int, act: int) -> Scheme:
        return Scheme(bits, quant.group_size, sb, not quant.symmetric, act) if bits else flt

    embed = scheme(quant.embed_bits, 0)
    head = embed if tied and not quant.head_bits else scheme(quant.head_bits, quant.act_bits)
    return Storage(scheme(quant.bits, quant.act_bits), embed, head, fb, KV_BITS[kv_dtype])


def unties(pipeline: list[tuple[str, dict]]) -> bool:
    """Whether a pass of the pipeline gives a tied head its own weight."""
    return any(name == "canon.untie_embeddings" or opts.get("untie") for name, opts in pipeline)


def quant_of(pipeline: list[tuple[str, dict]], where: str) -> Quant | None:
    """The storage-deciding options of a pipeline of (pass name, options); a pass the cost
    model does not see through is refused."""
    quant = None
    for name, opts in pipeline:
        if not name.startswith(NEUTRAL):
            raise SlmcError(f"pass {name} changes the model's shapes, which the estimate does not model "
                            "(it models canon.*, quant.* and kv.cache)", where)
        if name.startswith("quant.") and "bits" in opts and opts.get("quantize", True):
            quant = Quant.from_options(opts)
    return quant
