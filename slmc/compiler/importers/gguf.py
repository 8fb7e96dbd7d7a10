"""Import a GGUF file (llama.cpp's format) into the IR, without transformers.

The metadata becomes a Hugging Face-style config dict (so the family's own
`normalize` reads it exactly as it reads config.json), the tensors are exposed
under their Hugging Face names through `GGUFSource`, and `build_model` does the
rest. `gguf.GGUFReader` memory-maps the file (no pickle); each tensor is
dequantized to float32 (F16 stays float16) the first time it is used.

llama.cpp's converter permutes the q/k projection rows of llama-architecture
models so that its "normal" rope rotates interleaved pairs (x0, x1), (x2, x3) ...
The IR uses Hugging Face's rotate-half convention (x_j, x_{j+d/2}), so those
rows are permuted back on load. Qwen2/Qwen3/Phi-3 use NEOX (rotate-half) rope in
llama.cpp and are stored unpermuted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ...errors import SlmcError, UnsupportedError
from ..families import load_all
from ..families.base import _BY_ARCH, build_model
from ..ir import Model, QuantWeight, Weight
from .gguf_blocks import LAYOUTS, block_codes, permute_rows
from .hf import check_finite, check_max_seq_len

log = logging.getLogger("slmc")

GGUF_MAGIC = b"GGUF"


class GGUFArch(NamedTuple):
    hf: str  # the HF architecture, which picks the slmc family
    model_type: str
    permuted_qk: bool  # llama.cpp's converter permuted the q/k rows (interleaved rope)
    partial_rotary: bool = False  # the family reads `partial_rotary_factor`


# general.architecture -> how to read it. llama.cpp stores Mistral 7B as "llama" too (and,
# like it, slmc then ignores Mistral v0.1's sliding window).
ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2", permuted_qk=False),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3", permuted_qk=False),
    "phi3": GGUFArch("Phi3ForCausalLM", "phi3", permuted_qk=False, partial_rotary=True),
}

# "{arch}.<key>" metadata -> HF config.json field
ARCH_KEYS: dict[str, str] = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
    "attention.sliding_window": "sliding_window",  # Qwen2/3 apply it only with use_sliding_window
}
# architecture-independent metadata -> HF config.json field
GENERAL_KEYS: dict[str, str] = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
}
# further end-of-generation tokens llama.cpp stops on, appended to eos_token_id
EXTRA_EOS_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")

# Hugging Face tensor name -> GGUF tensor name
TOP_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# per layer: "model.layers.{i}.<hf>.{weight,bias}" -> "blk.{i}.<gguf>.{weight,bias}"
LAYER_NAMES: dict[str, str] = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",  # Phi-3: fused [q; k; v]
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: fused [gate; up], stored as ffn_up
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")

# GGUF tensors that carry no weights of their own, or that a supported model may omit
_IGNORED = {"output.weight"}
# per-frequency rope factors (Llama 3.1 rope scaling, Phi-3 LongRoPE): no IR equivalent
ROPE_FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def gguf_name(hf_name: str) -> str | None:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` on the rows of a q/k weight or bias:
    interleaved (x0, x1), (x2, x3) ... pairs back to rotate-half halves."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- reading the file


def check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise SlmcError(f"not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})", str(path))


def open_reader(path: Path):
    """GGUFReader over `path`, turning every way a corrupt file fails into one SlmcError."""
    from gguf import GGUFReader

    if path.stat().st_size < 24:
        raise SlmcError("file is truncated (no GGUF header)", str(path))
    check_magic(path)
    try:
        reader = GGUFReader(str(path), "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        log.debug("GGUFReader failed on %s: %r", path, e)
        raise SlmcError(f"corrupt or truncated GGUF file ({path.stat().st_size} bytes; its header or "
                        "tensor table does not fit)", str(path)) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise SlmcError(f"file is truncated: tensor {t.name!r} ends past the end of the file", str(path))
    return reader


def field_value(reader, key: str):
    """A metadata value as plain Python (str, int, float, bool, or a list of them); None if absent."""
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return None
    vals = []
    for i in f.data:
        p = f.parts[i]
        if f.types[-1] == GGUFValueType.STRING:
            vals.append(bytes(p).decode("utf-8", "replace"))
        else:
            vals.append(p.tolist()[0])
    return vals if f.types[0] == GGUFValueType.ARRAY else (vals[0] if vals else None)


def _uniform(value, key: str, where: str):
    """Per-layer arrays (some GGUFs store head_count_kv per layer) must hold one value."""
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise UnsupportedError(f"per-layer values for {key} ({value[:8]}...) are not supported", where)
        return value[0]
    return value


def gguf_config(reader, path: Path) -> tuple[dict, bool]:
    """(HF-style config dict, q/k rows permuted) from the metadata of an open GGUF file."""
    where = str(path)
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise SlmcError("missing general.architecture metadata", where)
    load_all()
    supported = sorted(a for a, spec in ARCHITECTURES.items() if spec.hf in _BY_ARCH)
    if arch not in supported:
        raise UnsupportedError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(supported)}",
                               where + ":general.architecture")
    spec = ARCHITECTURES[arch]
    for key in REQUIRED:
        if f"{arch}.{key}" not in reader.fields:
            raise SlmcError(f"missing required metadata {arch}.{key}", where)
    cfg: dict = {"architectures": [spec.hf], "model_type": spec.model_type}
    for key, hf_key in ARCH_KEYS.items():
        v = field_value(reader, f"{arch}.{key}")
        if v is not None:
            cfg[hf_key] = _uniform(v, f"{arch}.{key}", where)
    for key, hf_key in GENERAL_KEYS.items():
        v = field_value(reader, key)
        if v is not None:
            cfg[hf_key] = v
    eos = [cfg["eos_token_id"]] if "eos_token_id" in cfg else []
    eos += [v for k in EXTRA_EOS_KEYS if (v := field_value(reader, k)) is not None and v not in eos]
    if eos:
        cfg["eos_token_id"] = eos if len(eos) > 1 else eos[0]

    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is not None and len(embd.shape) == 2:
        cfg["vocab_size"] = int(embd.shape[1])  # ne order: [hidden, vocab]
    elif "vocab_size" not in cfg and "tokenizer.ggml.tokens" in reader.fields:
        cfg["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors

    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["head_dim"] = head_dim  # explicit: some families default it (Qwen3: 128)
    rope_dim = field_value(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and rope_dim != head_dim:
        if not spec.partial_rotary:
            raise UnsupportedError(f"partial rotary embeddings (rope dim {rope_dim} of head dim {head_dim}) "
                                   f"are not supported for GGUF {arch}", where)
        cfg["partial_rotary_factor"] = rope_dim / head_dim
    factors = [t for t in ROPE_FACTOR_TENSORS if t in tensors]
    if factors:
        raise UnsupportedError(f"per-frequency rope factors ({factors[0]}: Llama 3.1-style rope scaling or "
                               "Phi-3 LongRoPE) are not supported for GGUF input; import the Hugging Face "
                               "folder instead", where)
    kind = field_value(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": field_value(reader, f"{arch}.rope.scaling.factor")}
        orig = field_value(reader, f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = orig
        cfg["rope_scaling"] = scaling  # rope_of() refuses the kinds slmc cannot run
    return cfg, spec.permuted_qk


# ---------------------------------------------------------------- tensors


class GGUFSource:
    """TensorSource over one GGUF file: Hugging Face names -> lazily dequantized Weights."""

    def __init__(self, reader, path: Path, permute_heads: dict[str, int] | None = None,
                 keep_codes: bool = False):
        self.reader, self.path, self.keep_codes = reader, path, keep_codes
        self._tensors = {t.name: t for t in reader.tensors}
        self._permute = permute_heads or {}  # GGUF layer-tensor stem ("attn_q") -> heads
        self.used: set[str] = set()  # GGUF names

    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        g = gguf_name(name)
        return g is not None and g in self._tensors

    def describe(self, name: str) -> str:
        return f"{self.path.name}:{gguf_name(name) or name}"

    def _heads_for(self, g: str) -> int | None:
        parts = g.split(".")
        return self._permute.get(parts[2]) if len(parts) == 4 and parts[0] == "blk" else None

    def _codes(self, g: str, t, shape: tuple[int, int], heads: int | None) -> QuantWeight:
        """The tensor's own integer codes and scales (--keep-codes), never re-rounded."""
        try:
            w = block_codes(np.asarray(t.data), t.tensor_type.name, shape)
        except ValueError as e:
            raise SlmcError(f"{t.tensor_type.name} blocks contradict the tensor shape {list(shape)}: {e}",
                            f"{self.path}:{g}") from None
        if not bool(w.scales.isfinite().all()) or (w.zeros is not None and not bool(w.zeros.isfinite().all())):
            raise SlmcError(f"{t.tensor_type.name} block scales contain NaN or Inf", f"{self.path}:{g}")
        return permute_rows(w, lambda a: unpermute_rows(a, heads)) if heads else w

    def _load(self, g: str, shape: tuple[int, ...]) -> torch.Tensor:
        from gguf import GGMLQuantizationType, dequantize

        t = self._tensors[g]
        try:
            if t.tensor_type == GGMLQuantizationType.F16:
                a = np.asarray(t.data).view(np.float16)
            else:
                a = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UnsupportedError(f"GGUF tensor type {t.tensor_type.name} cannot be dequantized",
                                   f"{self.path}:{g}") from None
        a = a.reshape(shape)
        heads = self._heads_for(g)
        if heads:
            a = unpermute_rows(a, heads)
        return torch.from_numpy(np.array(a, copy=True))  # own the memory; the mmap stays read-only

    def weight(self, name: str) -> Weight | QuantWeight:
        from gguf import GGMLQuantizationType

        g = gguf_name(name)
        t = self._tensors[g]
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne0 (the row length) first
        heads = self._heads_for(g)
        if heads and shape[0] % (2 * heads):
            raise SlmcError(f"{shape[0]} rows cannot hold {heads} rope heads", self.describe(name))
        if self.keep_codes and t.tensor_type.name in LAYOUTS and len(shape) == 2:
            self.used.add(g)
            return self._codes(g, t, shape, heads)
        dtype = "float16" if t.tensor_type == GGMLQuantizationType.F16 else "float32"
        self.used.add(g)
        return Weight(shape=shape, dtype=dtype, loader=lambda: self._load(g, shape))


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def import_gguf(path: str | Path, max_seq_len: int | None = None, strict: bool = False,
                keep_codes: bool = False) -> Model:
    """keep_codes: Q4_0/Q4_1/Q8_0 matrices stay quantized with the file's own codes and scales
    (see gguf_blocks); otherwise every tensor is dequantized to float."""
    path = Path(path)
    if not path.exists():
        raise SlmcError("no such file or folder", str(path))
    if not path.is_file():
        raise SlmcError("expected a .gguf file", str(path))
    reader = open_reader(path)
    cfg, permuted = gguf_config(reader, path)
    family = _BY_ARCH[cfg["architectures"][0]]
    try:
        arch = family.normalize(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise SlmcError(f"cannot read {family.name} metadata: {e}", str(path)) from None
    check_max_seq_len(max_seq_len, arch.max_position, "--max-seq-len")
    permute = {"attn_q": arch.n_heads, "attn_k": arch.n_kv_heads} if permuted else {}
    src = GGUFSource(reader, path, permute, keep_codes)
    source = {"format": "gguf", "path": str(path.resolve()), "sha256": file_hash(path)}
    if keep_codes:
        source["keep_codes"] = True
    model = build_model(family, arch, src, max_seq_len, source)
    unused = set(src.names()) - src.used - _IGNORED
    if unused:
        log.warning("%d GGUF tensors were not used, e.g. %s", len(unused), sorted(unused)[0])
    check_finite(model, strict)
    return model


@contextlib.contextmanager
def hf_offline():
    """Keep transformers / huggingface_hub off the network while converting local files."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tokenizer_from_gguf(path: str | Path, out_dir: str | Path, model_max_length: int | None = None) -> Path:
    """Write the GGUF's tokenizer (tokenizer.json, tokenizer_config.json, chat template) to
    `out_dir` with transformers' GGUF tokenizer conversion, offline. Needs transformers."""
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise SlmcError("no such file", str(path))
    check_magic(path)
    with hf_offline():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        except (ValueError, KeyError) as e:
            raise UnsupportedError(f"cannot convert the GGUF tokenizer: {e}", str(path)) from None
        if model_max_length:
            tok.model_max_length = model_max_length
        out_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for k in ("is_local", "local_files_only", "gguf_file"):  # load-time options, not tokenizer settings
        tc.pop(k, None)
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    return out_dir
