"""Calibration data for the data-aware quantization passes (quant.gptq, quant.awq).

Two sources, both deterministic for a seed:

- **Your own text** (`calib=FILE;FILE` in the pass options; ';' because commas separate
  pass options). The files are read and checked like `slmc eval`'s text (missing, empty,
  binary or non-UTF-8 files are refused with exit 2), tokenized with the model's own
  tokenizer.json (next to model.source["path"]: the HF folder, or the folder holding the
  .gguf) and cut into `n_seqs` windows of `seq_len` tokens. With enough text the stream is
  split into n_seqs equal strata and each window starts at a seeded random offset inside
  its stratum (no overlap, the whole text is covered); with less (but at least seq_len
  tokens) the windows start at seeded random offsets and may overlap. Fewer than seq_len
  tokens is "too short" (exit 2).
- **Data-free** (the default, no calib=): n_seqs sequences of seq_len tokens sampled from
  the model itself at temperature 1 with a seeded generator; each starts from a seeded
  random token of the vocabulary (a fixed BOS, e.g. an instruct model's `<|im_start|>`,
  would pull every sample into the chat template). It needs no files and no network.
  Sampling uses the lowered module's KV cache, batched over sequences with torch.func.vmap
  (one fresh cache per batch instead of reset_cache() per sequence): on CPU one decode step
  reads every weight, so batching the sequences is what makes sampling affordable.

`run_block` then pushes calibration activations through one block in stages and hands
each stage's input to a hook before the stage uses its weights (GPTQ quantizes them
there, so later stages see the quantized earlier ones; AWQ records them).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import SlmcError
from .ir import (MLP, Attention, KVCacheSpec, Linear, Model, MoE, Norm, QuantWeight, Weight, named_weights,
                 row_chunks, transient_reads)
from .reference import activation, attention, gate_up, linear, moe, rms_norm
from .textdata import find_tokenizer_dir

SAMPLE_BATCH = 32  # sequences decoded together (KV caches for all of them are held)
_SAMPLES: dict[tuple, torch.Tensor] = {}  # data-free samples already drawn in this process
_SAMPLES_KEPT = 8


def split_files(calib: str) -> list[str]:
    """The pass option's file list: paths separated by ';'."""
    return [p.strip() for p in calib.split(";") if p.strip()]


def tokenizer_json(model: Model) -> Path | None:
    d = find_tokenizer_dir(model.source.get("path"))
    return d / "tokenizer.json" if d is not None else None


def _check(model: Model, n_seqs: int, seq_len: int, where: str) -> None:
    if n_seqs < 1 or seq_len < 2:
        raise SlmcError(f"need n_seqs >= 1 and seq_len >= 2 (got {n_seqs}, {seq_len})", where)
    if seq_len > model.max_position:
        raise SlmcError(f"seq_len {seq_len} exceeds the model's {model.max_position} positions", where)


def text_ids(model: Model, files: list[str], n_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
    from .textdata import token_ids

    tok = tokenizer_json(model)
    if tok is None:
        raise SlmcError("calibration text needs the model's tokenizer.json and there is none next to "
                        f"{model.source.get('path')}; leave calib= empty to calibrate data-free", "calib")
    ids = torch.tensor(token_ids(files, tok, min_tokens=seq_len, what="calibration text"), dtype=torch.long)
    n, g = len(ids), torch.Generator().manual_seed(seed)
    if n >= n_seqs * seq_len:
        stride = n // n_seqs
        starts = torch.arange(n_seqs) * stride + torch.randint(0, stride - seq_len + 1, (n_seqs,), generator=g)
    else:
        starts = torch.randint(0, n - seq_len + 1, (n_seqs,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def _float_view(model: Model, max_len: int) -> Model:
    """The model with a fresh fp32 KV spec of max_len and quantized tensors dequantized
    (the lowering takes float weights only); weights are shared, not copied."""
    memo = {id(w): Weight(w.float()) if isinstance(w, QuantWeight) else w for _, w in named_weights(model)}
    view = copy.deepcopy(model, memo)
    view.kv = KVCacheSpec(max_len=max_len)
    return view


FIRST = ("random", "bos")  # how a data-free sample's first token is chosen


def fingerprint(model: Model) -> str:
    """A digest of every weight (its sum and a strided sample of its values): two models with
    the same fingerprint compute the same function, so they draw the same samples. Each tensor
    is read a chunk of rows at a time, loaded or not (Weight.row_chunks: a checkpoint's 128k-row
    table is not read whole, 0.5 GB at 1B), and a mapped one's pages are let go as it goes."""
    from .spill import file_ranges, let_go

    h = hashlib.sha1()
    for name, w in named_weights(model):
        tables = [(row_chunks(w.codes), w.codes.numel()), (row_chunks(w.scales), w.scales.numel())] \
            if isinstance(w, QuantWeight) else [(w.row_chunks(), w.numel())]
        for chunks, numel in tables:
            k, seen, total, samples = max(1, numel // 4096), 0, 0.0, []
            for t in chunks:
                flat = t.reshape(-1)
                samples.append(flat[(-seen) % k::k].float())  # every k-th value of the whole
                total += float(flat.double().sum())  # a chunk's float64 copy (a whole table's: 2 GB)
                seen += flat.numel()
                let_go(file_ranges([t]))
            h.update(name.encode())
            h.update(torch.cat(samples).numpy().tobytes() if samples else b"")
            h.update(repr(total).encode())
    return h.hexdigest()


def sample_ids(model: Model, n_seqs: int, seq_len: int, seed: int, temperature: float = 1.0,
               first: str = "random") -> torch.Tensor:
    """Data-free samples, drawn once per process for the same weights and settings: sampling is
    a large share of a data-free pass's cost, and several passes or bench variants on one model
    ask again (a pass that changed the weights draws anew, unless it kept the function and said
    so with `carry_samples`)."""
    with transient_reads(model):
        key = (fingerprint(model), n_seqs, seq_len, seed, float(temperature), first)
        if key not in _SAMPLES:
            if len(_SAMPLES) >= _SAMPLES_KEPT:
                _SAMPLES.pop(next(iter(_SAMPLES)))
            _SAMPLES[key] = _draw(model, n_seqs, seq_len, seed, temperature, first)
    return _SAMPLES[key].clone()


def carry_samples(ids: torch.Tensor, model: Model) -> int:
    """After a pass that rewrote weights but kept the float function (quant.awq's scale fold with
    quantize=false), the samples `ids` it drew from the model as it was are samples of the model as
    it is: file them under its new weights too, so the next pass does not draw them again
    (Qwen2.5-3B: 1362 s for quant.gptq's second draw, bench/results/scale.json). Found by value,
    so the weights as they were need no second digest. Returns how many sample sets were carried."""
    got = [(k, v) for k, v in _SAMPLES.items() if torch.equal(v, ids)]
    if got:
        with transient_reads(model):
            after = fingerprint(model)
        for k, v in got:
            _SAMPLES[(after, *k[1:])] = v
    return len(got)


@torch.no_grad()
def _draw(model: Model, n_seqs: int, seq_len: int, seed: int, temperature: float, first: str) -> torch.Tensor:
    """first="random": a seeded random vocabulary token; "bos": the model's BOS token."""
    from .lowering.module import LoweredLM
    from .spill import page_out_weights

    lm = LoweredLM(_float_view(model, seq_len)).eval()
    page_out_weights()  # the module holds its own copies; the checkpoint's pages can go
    with _streamed(lm):
        return _sample(lm, model, n_seqs, seq_len, seed, temperature, first)


HEAD_ROWS = 8192  # output rows of the head per matmul while sampling


class _RowsStreamedHead(torch.nn.Module):
    """The head's matmul HEAD_ROWS output rows at a time, each block's file pages let go after
    it (spill.let_go): Llama-3.2-1B's fp32 128k-row table is 1 GB, resident whole for one
    F.linear. Each logit is the same dot product; bit-equal samples are tested."""

    def __init__(self, head, rows: int):
        super().__init__()
        from . import spill

        self.head = head
        W = head.weight
        self.parts = [(r, min(r + rows, W.shape[0]), spill.file_ranges([W[r:r + rows]]))
                      for r in range(0, W.shape[0], rows)]

    def forward(self, x):
        from . import spill

        W, b = self.head.weight, self.head.bias
        out = []
        for r0, r1, ranges in self.parts:
            out.append(torch.nn.functional.linear(x, W[r0:r1], None if b is None else b[r0:r1]))
            spill.let_go(ranges)
        return torch.cat(out, -1)


@contextlib.contextmanager
def _streamed(lm):
    """Within: sampling reads `lm`'s weights a piece at a time. Each block's fp32 pages go once
    it has run (its Parameters are mapped from a scratch file, lowering/layers.py), and the head
    (when it is a plain linear) a block of rows at a time: a step holds one block, not the model."""
    from .lowering.layers import LLinear
    from .spill import streaming_pages

    head = lm.head
    if type(head) is LLinear:
        lm.head = _RowsStreamedHead(head, HEAD_ROWS)
    try:
        with streaming_pages([*lm.blocks, lm.head]):
            yield
    finally:
        lm.head = head


def _sample(lm, model: Model, n_seqs: int, seq_len: int, seed: int, temperature: float, first: str) -> torch.Tensor:
    caches = {n: b for n, b in lm.named_buffers() if "_cache_" in n}
    step = torch.func.vmap(lambda tok, c, pos: torch.func.functional_call(lm, c, (tok, pos)),
                           in_dims=(0, 0, None))
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n_seqs, seq_len, dtype=torch.long)
    if first == "bos" and model.bos_id is None:
        raise SlmcError("first=bos: this model has no BOS token; use first=random", "calibration")
    out[:, 0] = model.bos_id if first == "bos" else torch.randint(0, model.vocab_size, (n_seqs,), generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # index_copy_ falls back to a loop
        for b0 in range(0, n_seqs, SAMPLE_BATCH):
            rows = out[b0:b0 + SAMPLE_BATCH]
            c = {n: torch.zeros((len(rows), *t.shape), dtype=t.dtype) for n, t in caches.items()}
            for t in range(seq_len - 1):
                logits = step(rows[:, t].view(-1, 1, 1), c, torch.tensor([t]))
                probs = torch.softmax(logits.reshape(len(rows), -1).float() / temperature, dim=-1)
                rows[:, t + 1] = torch.multinomial(probs, 1, generator=g)[:, 0]
    return out


def calibration_ids(model: Model, files: list[str], n_seqs: int, seq_len: int, seed: int,
                    temperature: float = 1.0, first: str = "random") -> torch.Tensor:
    """[n_seqs, seq_len] token ids: windows of the user's text, or data-free samples
    (temperature and first apply to those only)."""
    _check(model, n_seqs, seq_len, "calibration")
    if not temperature > 0 or first not in FIRST:
        raise SlmcError(f"need temperature > 0 and first in {'/'.join(FIRST)} (got {temperature}, {first!r})",
                        "calibration")
    if files:
        return text_ids(model, files, n_seqs, seq_len, seed)
    return sample_ids(model, n_seqs, seq_len, seed, temperature, first)


def describe(files: list[str], n_seqs: int, seq_len: int, seed: int, temperature: float = 1.0,
             first: str = "random") -> str:
    src = ("text " + ";".join(files) if files else
           f"data-free (sampled from the model, temperature {temperature:g}, first token {first})")
    return f"{src}, {n_seqs}x{seq_len} tokens, seed {seed}"


# --- activations through one block ----------------------------------------------------------------

@dataclass(eq=False)
class Site:
    """The linears of a block that read one input, and what produced that input.

    attn_in: q/k/v (or qkv) after attn_norm      o: o after attention, rows = v's rows
    ffn_in: every gate/up after ffn_norm (all experts and the shared one; `extra` holds
            the float router and shared gate, which read the same input)
    down: one MLP's down after act(gate) * up, rows = up's rows
    """

    name: str
    linears: list[Linear]
    x: torch.Tensor  # [tokens, in_features]
    norm: Norm | None = None
    rows: tuple[Linear, slice] | None = None
    extra: list[Linear] = field(default_factory=list)
    attn: Attention | None = None


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _up_rows(m: MLP) -> tuple[Linear, slice]:
    if m.fused:
        n = m.gate_up.out_features // 2
        return m.gate_up, slice(n, 2 * n)
    return m.up, slice(0, m.up.out_features)


def _gate_up_linears(m: MLP) -> list[Linear]:
    return [m.gate_up] if m.fused else [m.gate, m.up]


@torch.no_grad()
def run_block(b, x: torch.Tensor, hook: Callable[[Site], None], chunk_tokens: int = 2048) -> torch.Tensor:
    """x: [N, T, hidden] -> the block's output. hook(site) runs before each stage."""
    N, T, _ = x.shape
    pos = torch.arange(T)
    a = b.attn
    n1 = rms_norm(x, b.attn_norm)
    hook(Site("attn_in", [a.qkv] if a.fused else [a.q, a.k, a.v], _flat(n1), norm=b.attn_norm, attn=a))
    # attention up to (not including) o: the same code with o replaced by the identity
    width = a.n_heads * a.head_dim
    core_attn = dataclasses.replace(a, o=Linear(Weight(torch.eye(width))))
    step = max(1, chunk_tokens // T)
    core = torch.cat([attention(core_attn, n1[i:i + step], pos) for i in range(0, N, step)])
    nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    v_rows = (a.qkv, slice(nq + nkv, nq + 2 * nkv)) if a.fused else (a.v, slice(0, nkv))
    hook(Site("o", [a.o], _flat(core), rows=v_rows, attn=a))
    h = linear(core, a.o)
    del n1, core  # not held through the FFN's hooks (GPTQ's 8192-wide Hessian work comes there)
    if b.post_attn_norm is not None:
        h = rms_norm(h, b.post_attn_norm)
    x = x + h
    del h
    n2 = rms_norm(x, b.ffn_norm)
    f = b.ffn
    mlps = [f] if isinstance(f, MLP) else f.experts + ([f.shared] if f.shared is not None else [])
    extra = [] if isinstance(f, MLP) else [f.router] + ([f.shared_gate] if f.shared_gate is not None else [])
    hook(Site("ffn_in", [lin for m in mlps for lin in _gate_up_linears(m)], _flat(n2), norm=b.ffn_norm,
              extra=extra))
    for m in mlps:  # MoE experts see every token here, not only the ones routed to them
        g, u = gate_up(m, n2)
        d_in = activation(m.act, g) * u
        del g, u  # two [tokens, intermediate] tensors not held while the hook works (GPTQ's Hessian)
        hook(Site("down", [m.down], _flat(d_in), rows=_up_rows(m)))
        if isinstance(f, MLP):
            h = linear(d_in, m.down)
    if isinstance(f, MoE):
        h = moe(f, n2)
    if b.post_ffn_norm is not None:
        h = rms_norm(h, b.post_ffn_norm)
    return x + h


GRAM_TOKENS = 4096  # tokens per fp32 product in gram()


def _gram_one_chunk(x: torch.Tensor) -> torch.Tensor:
    """gram() of at most GRAM_TOKENS tokens, 512 rows of X^T X at a time, each made from its
    512 columns of x (no whole fp32 product beside the result: 256 MiB at 8192 wide) and put
    through the same per-element fp64 sum, / n and rounding as the chunked path."""
    out = torch.empty(x.shape[1], x.shape[1])
    for r in range(0, len(out), 512):
        p = x[:, r:r + 512].T @ x
        out[r:r + 512] = torch.zeros(p.shape, dtype=torch.float64).add_(p).div_(max(1, x.shape[0])).float()
    return out


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X / n of a stage input [tokens, in] (fp32 chunks summed in fp64, fp32 result)."""
    x = x.reshape(-1, x.shape[-1]).float()
    if x.shape[0] <= GRAM_TOKENS:  # one chunk (the default 16 x 256 tokens): no fp64 matrix at all
        return _gram_one_chunk(x)
    h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for i in range(0, x.shape[0], GRAM_TOKENS):
        xc = x[i:i + GRAM_TOKENS]
        # 512 rows of the product at a time, as _gram_one_chunk (no whole fp32 product), each
        # promoted on its own: add_ makes an fp64 temporary of its fp32 operand
        for r in range(0, len(h), 512):
            h[r:r + 512].add_(xc[:, r:r + 512].T @ xc)
    return h.div_(max(1, x.shape[0])).float()
