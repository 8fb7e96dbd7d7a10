"""slmc's IR: a decoder-only language model as a small tree of typed dataclasses.

The IR is target-neutral. It says *what* the model computes (norms, attention with
its KV-head groups, gated MLPs or mixtures of experts, quantized or dense tensors,
which block runs at which depth, the KV-cache contract), never *how* a runtime
should lay it out. Passes rewrite it; the reference executor runs it; lowering
turns it into a torch module per target.

Block sharing is explicit: `Model.blocks` holds each distinct block once and
`Model.layers[d]` names the block that runs at depth `d`. Every depth keeps its own
KV-cache slot even when two depths share one block.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Union

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def row_chunks(t: torch.Tensor, elems: int = 1 << 22):
    """Tensor `t` a chunk of rows (about `elems` elements) at a time (Weight.row_chunks uses it)."""
    if t.dim() == 0:
        yield t
        return
    step = max(1, elems // max(1, t[0].numel())) if len(t) else 1
    for r in range(0, len(t), step):
        yield t[r:r + step]


class Weight:
    """A dense tensor. Data may come from a loader that reads it on first use,
    so importing a checkpoint never holds two copies of it in RAM."""

    __slots__ = ("shape", "dtype", "_data", "_loader", "_part")

    def __init__(self, data: torch.Tensor | None = None, *, shape=None, dtype: str | None = None,
                 loader: Callable[[], torch.Tensor] | None = None,
                 part: Callable[[int, int], torch.Tensor] | None = None):
        if data is None and loader is None:
            raise ValueError("Weight needs data or a loader")
        self._data = data
        self._loader = loader
        self._part = part  # (r0, r1) -> rows r0:r1 read alone, where the source can
        self.shape = tuple(data.shape) if data is not None else tuple(shape)
        self.dtype = DTYPE_NAMES[data.dtype] if data is not None else dtype

    @property
    def data(self) -> torch.Tensor:
        if self._data is None:
            t = self._loader()
            if tuple(t.shape) != self.shape:
                raise ValueError(f"loaded shape {tuple(t.shape)} != declared {self.shape}")
            if not _KEEP_READS[0]:
                return t  # read_through(): this use only
            self._data = t
        return self._data

    @property
    def loaded(self) -> bool:
        return self._data is not None

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 (first dimension). Not in memory and from a source that reads parts (a
        safetensors file): those rows alone, not cached, so a check or RTN over a 128k-row
        table holds a chunk of it, not the whole 0.5 GB (issue 17)."""
        if self._data is None and self._part is not None:
            r0, r1 = max(0, r0), min(r1, self.shape[0])
            t = self._part(r0, r1) if r1 > r0 else torch.empty((0, *self.shape[1:]), dtype=DTYPES[self.dtype])
            if tuple(t.shape) != (r1 - r0, *self.shape[1:]):
                raise ValueError(f"read rows {r0}:{r1} as shape {tuple(t.shape)} of {self!r}")
            return t
        return self.data[r0:r1]

    def row_chunks(self, elems: int = 1 << 22):
        """The whole tensor a chunk of rows (about `elems` elements) at a time (see rows); a
        weight not in memory whose source reads only whole tensors is read once, not kept."""
        if self._data is None and self._part is not None and self.shape:
            step = max(1, elems // max(1, self.numel() // max(1, self.shape[0])))
            for r in range(0, self.shape[0], step):
                yield self.rows(r, r + step)
            return
        whole = self._data
        if whole is None:  # read once for this walk, not kept
            whole = self._loader()
            if tuple(whole.shape) != self.shape:
                raise ValueError(f"loaded shape {tuple(whole.shape)} != declared {self.shape}")
        yield from row_chunks(whole, elems)

    def release(self) -> None:
        """Drop the cached data if it can be re-read (keeps peak RSS one layer deep)."""
        if self._loader is not None:
            self._data = None

    def rebind(self, t: torch.Tensor) -> None:
        """Hold `t`, a tensor with the same values (e.g. a file-mapped copy), instead of the
        current data, so the old copy can be freed."""
        if tuple(t.shape) != self.shape or t.dtype != DTYPES[self.dtype]:
            raise ValueError(f"rebind: {t.dtype}{list(t.shape)} for {self!r}")
        self._data = t

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def nbytes(self) -> int:
        return self.numel() * torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def float(self) -> torch.Tensor:
        return self.data.float()

    def __repr__(self) -> str:
        return f"Weight({self.dtype}{list(self.shape)})"


DEQUANT_CHUNK = 1 << 22  # elements dequantized at a time (16 MiB of fp32 per temporary)


@dataclass(eq=False)
class QuantWeight:
    """A groupwise-quantized 2-D weight [out, in].

    dequant(w)[o, i] = (codes[o, i] - zeros[o, i // g]) * scales[o, i // g]
    `codes` are unpacked integers: int8 in [-2^(b-1), 2^(b-1)-1] when symmetric,
    uint8 in [0, 2^b - 1] otherwise; `zeros` is None when symmetric.
    `act_bits` = 8: the matmul reading this weight quantizes its input at run time to
    int8, asymmetric per token (XNNPACK's 8da4w/8da8w kernels); 0: float activations.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    bits: int
    symmetric: bool
    algorithm: str = "rtn"
    act_bits: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def dtype(self) -> str:
        return f"{'s' if self.symmetric else 'a'}int{self.bits}g{self.group_size}"

    def numel(self) -> int:
        return self.codes.numel()

    def nbytes(self) -> int:
        extra = self.scales.numel() * 4 + (self.zeros.numel() * 4 if self.zeros is not None else 0)
        return self.codes.numel() * self.bits // 8 + extra

    def float(self) -> torch.Tensor:
        """The exact dequantized weight (cached: the reference executor asks every forward;
        not under `dequant_cache(False)`, where one forward is all there is)."""
        cached = self.__dict__.get("_dequant")
        if cached is not None and cached[0] is self.codes and cached[1] is self.scales:
            return cached[2]
        rows, cols = self.codes.shape
        w = torch.empty(rows, cols)
        step = max(1, DEQUANT_CHUNK // max(1, cols))
        for r in range(0, rows, step):  # in row chunks: the temporaries stay small beside w (issue 17)
            w[r:r + step] = self.rows(slice(r, r + step))
        if _DEQUANT_CACHE[0]:
            self.__dict__["_dequant"] = (self.codes, self.scales, w)
        return w

    def rows(self, idx, cols: slice = slice(None)) -> torch.Tensor:
        """The dequantized rows `idx` (a slice or index tensor) only: e.g. an embedding lookup's;
        `cols`, a slice starting on a group boundary, narrows them to those columns."""
        g = self.group_size
        lo, hi, _ = cols.indices(self.shape[1])
        groups = slice(lo // g, -(-hi // g))
        codes = self.codes[idx][:, lo:hi].float()
        z = self.zeros[idx][:, groups].float().repeat_interleave(g, dim=1)[:, :hi - lo] if self.zeros is not None else 0.0
        return (codes - z) * self.scales[idx][:, groups].float().repeat_interleave(g, dim=1)[:, :hi - lo]


# The cache holds an fp32 copy of every quantized weight the reference executor has read: right
# for perplexity (thousands of forwards), but a compile reads each weight a few times, and the
# cache then made its peak the fp32 model again on top of the codes (bench/results/scale.md:
# +4.4 GB at Llama-3.2-1B in the check bundle's reference run alone).
_DEQUANT_CACHE = [True]


@contextmanager
def dequant_cache(on: bool):
    """Within: QuantWeight.float() caches its result only if `on`."""
    prev, _DEQUANT_CACHE[0] = _DEQUANT_CACHE[0], on
    try:
        yield
    finally:
        _DEQUANT_CACHE[0] = prev


@contextmanager
def transient_reads(model):
    """Within: the lazily loaded weights read (a data-free sample, a fingerprint: each reads the
    whole model) are dropped again at the end, so the model stays as lazy as it was found and a
    block-by-block pass after it holds one block, not every weight (issue 17)."""
    lazy = [w for _, w in named_weights(model) if isinstance(w, Weight) and w._loader is not None and not w.loaded]
    try:
        yield
    finally:
        for w in lazy:
            w.release()


_KEEP_READS = [True]


@contextmanager
def read_through():
    """Within: a weight not yet loaded is read from its file at each use and not kept, so a
    whole-model run (the check bundle's reference outputs) holds one weight at a time, not
    the model (issue 17); re-reading costs a copy per use."""
    prev, _KEEP_READS[0] = _KEEP_READS[0], False
    try:
        yield
    finally:
        _KEEP_READS[0] = prev


def drop_dequant_caches(model) -> None:
    for _, w in named_weights(model):
        if isinstance(w, QuantWeight):
            w.__dict__.pop("_dequant", None)


AnyWeight = Union[Weight, QuantWeight]


@dataclass(eq=False)
class Linear:
    weight: AnyWeight  # [out, in]
    bias: Weight | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@dataclass(eq=False)
class Norm:
    """RMSNorm: x * rsqrt(mean(x^2) + eps) * (w + 1 if unit_offset else w)."""

    weight: Weight
    eps: float
    unit_offset: bool = False  # Gemma stores w - 1


@dataclass(eq=False)
class RoPE:
    theta: float
    dim: int  # rotated dims per head (<= head_dim); rotate-half convention
    scaling: dict | None = None  # {"rope_type": "linear"|"llama3", ...}


@dataclass(eq=False)
class Attention:
    n_heads: int
    n_kv_heads: int  # KV-head groups: n_heads // n_kv_heads query heads per group
    head_dim: int
    o: Linear
    rope: RoPE
    scale: float
    q: Linear | None = None
    k: Linear | None = None
    v: Linear | None = None
    qkv: Linear | None = None  # fused [q; k; v] rows, the alternative to q/k/v
    q_norm: Norm | None = None  # per-head RMSNorm before RoPE (Qwen3, Gemma 3)
    k_norm: Norm | None = None
    sliding_window: int | None = None  # attend to the last `window` positions only
    logit_softcap: float | None = None  # tanh soft-capping of scores (Gemma 2)

    @property
    def fused(self) -> bool:
        return self.qkv is not None


@dataclass(eq=False)
class MLP:
    """Gated MLP: down(act(gate(x)) * up(x)); gate/up may be fused as gate_up."""

    down: Linear
    act: str  # "silu" | "gelu_tanh"
    gate: Linear | None = None
    up: Linear | None = None
    gate_up: Linear | None = None  # fused [gate; up] rows

    @property
    def fused(self) -> bool:
        return self.gate_up is not None


@dataclass(eq=False)
class ExpertOffload:
    """An expert-offload plan (moe.offload): experts live in their own files and at most
    `cache_experts` of them (across all layers) are resident; the runner preloads the
    next MoE layer's likely experts from `transition`. Statistics come from calibration."""

    cache_experts: int  # K resident experts, total over all MoE layers
    expert_bits: int  # 0: float experts, else their RTN bit width
    frequencies: list[float]  # [E] share of routed (token, slot) pairs per expert, sums to 1
    transition: list[list[float]] | None = None  # [E, E'] P(e' at the next MoE depth | e here)


@dataclass(eq=False)
class MoE:
    """Top-k routed experts: softmax(router(x)) -> top_k -> weighted sum of experts."""

    router: Linear
    experts: list[MLP]
    top_k: int
    norm_topk_prob: bool = True
    shared: MLP | None = None  # always-on expert (Qwen2-MoE)
    shared_gate: Linear | None = None  # sigmoid gate on the shared expert, [1, hidden]
    offload: ExpertOffload | None = None  # set by moe.offload


@dataclass(eq=False)
class Block:
    attn_norm: Norm
    attn: Attention
    ffn_norm: Norm
    ffn: MLP | MoE
    post_attn_norm: Norm | None = None  # Gemma 2/3 "sandwich" norms
    post_ffn_norm: Norm | None = None


KV_LAYOUTS = ("bhsd", "bshd")
KV_DTYPES = ("float32", "float16", "int8")


@dataclass(eq=False)
class KVCacheSpec:
    """The contract between a model and its runtime's KV cache."""

    max_len: int
    layout: str = "bhsd"
    dtype: str = "float32"
    window: int | None = None  # ring buffer of this many positions (None: full length)
    sink_tokens: int = 0  # attention-sink positions kept when the ring wraps
    arena: bool = False  # one preallocated buffer with per-layer views

    @property
    def ring(self) -> tuple[int, int] | None:
        """(window, sink_tokens) of a ring-buffer cache; None for a linear one."""
        return (self.window, self.sink_tokens) if self.window is not None else None


@dataclass(eq=False)
class Model:
    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    embed: AnyWeight  # [vocab, hidden]
    blocks: list[Block]
    layers: list[int]  # depth -> index into blocks
    final_norm: Norm
    kv: KVCacheSpec
    max_position: int  # the model's own context limit
    lm_head: Linear | None = None  # None: tied to embed
    embed_scale: float = 1.0
    final_logit_softcap: float | None = None
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    source: dict = field(default_factory=dict)  # path, format, sha256 of the inputs

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def block_at(self, depth: int) -> Block:
        return self.blocks[self.layers[depth]]


IR_CLASSES = {c.__name__: c for c in (Linear, Norm, RoPE, Attention, MLP, MoE, ExpertOffload, Block,
                                             KVCacheSpec, Model)}


def named_weights(obj, prefix: str = "") -> Iterator[tuple[str, AnyWeight]]:
    """Every Weight/QuantWeight under `obj` with a stable dotted path, each object once."""
    seen: set[int] = set()

    def walk(o, path):
        if isinstance(o, (Weight, QuantWeight)):
            if id(o) not in seen:
                seen.add(id(o))
                yield path, o
        elif isinstance(o, list):
            for i, x in enumerate(o):
                yield from walk(x, f"{path}.{i}" if path else str(i))
        elif dataclasses.is_dataclass(o):
            for f in dataclasses.fields(o):
                yield from walk(getattr(o, f.name), f"{path}.{f.name}" if path else f.name)

    yield from walk(obj, prefix)


def _mlp_linears(m: MLP, where: str) -> Iterator[tuple[str, Linear]]:
    for nm in ("gate", "up", "gate_up", "down"):
        if getattr(m, nm) is not None:
            yield f"{where}.{nm}", getattr(m, nm)


def block_linears(model: Model, routers: bool = False) -> Iterator[tuple[str, Linear]]:
    """(path, Linear) for every projection in every block. Routers only when asked: the
    quantization passes keep them float (tiny, and routing is sensitive to them)."""
    for i, b in enumerate(model.blocks):
        a = b.attn
        for nm in ("q", "k", "v", "qkv", "o"):
            if getattr(a, nm) is not None:
                yield f"blocks.{i}.attn.{nm}", getattr(a, nm)
        if isinstance(b.ffn, MoE):
            if routers:
                yield f"blocks.{i}.ffn.router", b.ffn.router
            for e, ex in enumerate(b.ffn.experts):
                yield from _mlp_linears(ex, f"blocks.{i}.ffn.experts.{e}")
            if b.ffn.shared is not None:
                yield from _mlp_linears(b.ffn.shared, f"blocks.{i}.ffn.shared")
        else:
            yield from _mlp_linears(b.ffn, f"blocks.{i}.ffn")


def param_count(model: Model) -> int:
    return sum(w.numel() for _, w in named_weights(model))


def weight_bytes(model: Model) -> int:
    return sum(w.nbytes() for _, w in named_weights(model))
