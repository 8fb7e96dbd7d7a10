"""arch.share_layers: store a block (or only its FFN) once and run it at several depths
(MobileLLM's immediate block-wise sharing, MobiLlama's shared FFN).

The IR already says which block runs at which depth (`Model.layers`); every depth keeps
its own KV-cache slot, so sharing weights never shares a cache. Three modes:

- `lossless` (default): find blocks, and failing that FFNs (MLP or MoE), whose weights are
  bit-identical (a MobileLLM-style checkpoint that stores a repeated block twice, a merged
  model ...). Equal blocks collapse into one entry of `blocks` that `layers` names at every
  depth; equal FFNs become one object referenced by every block that has it. Exact: the
  logits do not change. Tensors are compared by a blake2b digest of their raw bytes, then
  byte for byte, so -0.0 != 0.0 and NaN payloads count.
- `block` / `ffn` (lossy): share up to floor(budget x layers) adjacent depth pairs (d, d+1).
  `budget` is the fraction of depths that give up their own weights, so 0.5 pairs every
  depth (MobileLLM's layout). A pair qualifies when both blocks (FFNs) have the same
  structure and each runs at one depth only. For each pair and each merge,
    first    keep the block (FFN) of depth d for both depths,
    second   keep the one of depth d+1,
    average  their elementwise mean (float weights only),
  the pair is run on calibration activations (calib=FILE;FILE or data-free samples, see
  compiler/calib.py), each block fed the original model's hidden state at depth d, and
  scored by the relative error of its output at depth d+2 as the next consumer reads it:
  ||N(y') - N(y)||^2 / ||N(y)||^2, N = the next depth's attn_norm (the final norm after the
  last depth), since every later layer reads the residual stream through an RMSNorm. Each
  pair takes its best merge (merge=auto) or the one named; a dynamic program then picks the
  set of non-overlapping pairs of the largest feasible count <= the budget with the smallest
  summed error. Errors are measured independently per pair (on the original inputs), not
  after earlier merges. Which merge wins is data: on SmolLM2-135M keeping one block beats the
  average of two unrelated blocks (see bench/results/arch_share.md); averaging wins on
  near-identical pairs (e.g. a fine-tune of a shared-weight model).
  The perplexity proxy: next-token perplexity, KL(original || shared) and top-1 agreement
  of the final logits on the calibration tokens, before and after.

PassResult.info: the pairs shared (depths, kind, merge, error), weight bytes saved, the
calibration error and the proxy. Targets store a shared tensor once (the lowering makes
one Parameter per IR weight object; tested on .pte, .tflite and Core ML weights).

Before (4 layers):              After mode=block, budget=0.25:    After mode=ffn, budget=0.25:
  block 0 (depth 0): ...          block 0 (depth 0): ...            block 0 (depth 0): ...
  block 1 (depth 1):              block 1 (depth 1,2):              block 1 (depth 1):
    attn: ... q f32[64,64] ...      attn: ... q f32[64,64] ...        attn: ... q f32[64,64] ...
    mlp(silu): gate f32[128,64]     mlp(silu): gate f32[128,64]       mlp(silu): gate f32[128,64]
  block 2 (depth 2):              block 2 (depth 3): ...            block 2 (depth 2):
    attn: ... q f32[64,64] ...                                        attn: ... q f32[64,64] ...
    mlp(silu): gate f32[128,64]                                       ffn: shared with blocks.1.ffn
  block 3 (depth 3): ...                                            block 3 (depth 3): ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compiler import reference
from ..compiler.ir import Block, Model, QuantWeight, Weight, weight_bytes
from ..compiler.pass_manager import Pass, PassResult, register
from ..errors import SlmcError
from ._options import CalibOptions

MODES = ("lossless", "block", "ffn")
MERGES = ("auto", "first", "second", "average")
WHERE = "--pass arch.share_layers"


@dataclass(frozen=True)
class ShareOptions(CalibOptions):
    mode: str = "lossless"
    budget: float = 0.1  # lossy modes: fraction of depths that may lose their own weights, 0..0.5
    merge: str = "auto"  # lossy modes: auto (the smallest error per pair), first, second, average
    n_seqs: int = 8  # this pass's own defaults (CalibOptions: 16 x 256)
    seq_len: int = 128

    def __post_init__(self):
        if self.mode not in MODES:
            raise SlmcError(f"unknown mode {self.mode!r}; modes: {', '.join(MODES)}", WHERE + ":mode")
        if not (isinstance(self.budget, (int, float)) and 0.0 <= self.budget <= 0.5):
            raise SlmcError(f"budget {self.budget} is outside 0..0.5 (the fraction of layers that may "
                            "become shared; 0.5 pairs every layer)", WHERE + ":budget")
        if self.merge not in MERGES:
            raise SlmcError(f"unknown merge {self.merge!r}; merges: {', '.join(MERGES)}", WHERE + ":merge")


# --- structure, fingerprints, equality -----------------------------------------------------------

def _tensors(w) -> list[torch.Tensor]:
    if isinstance(w, QuantWeight):
        return [w.codes, w.scales] + ([w.zeros] if w.zeros is not None else [])
    return [w.data]


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _qmeta(w: QuantWeight) -> tuple:
    return tuple((f.name, getattr(w, f.name)) for f in dataclasses.fields(w)
                 if not isinstance(getattr(w, f.name), torch.Tensor) and f.name != "zeros")


def _walk_key(obj, leaf) -> object:
    """A hashable description of a subtree; `leaf(weight)` describes each tensor."""
    if isinstance(obj, (Weight, QuantWeight)):
        return leaf(obj)
    if dataclasses.is_dataclass(obj):
        return (type(obj).__name__,) + tuple((f.name, _walk_key(getattr(obj, f.name), leaf))
                                             for f in dataclasses.fields(obj))
    if isinstance(obj, list):
        return tuple(_walk_key(x, leaf) for x in obj)
    if isinstance(obj, dict):
        return repr(sorted(obj.items()))
    return obj


def skeleton(obj) -> object:
    """Everything about a subtree but its tensor values: two blocks with equal skeletons can
    stand in for each other (same shapes, dtypes, quant schemes, heads, rope, window ...)."""
    def leaf(w):
        if isinstance(w, QuantWeight):
            return ("Q", w.shape, _qmeta(w), w.zeros is None)
        return ("W", w.shape, w.dtype)
    return _walk_key(obj, leaf)


class _Digests:
    """blake2b of each tensor's raw bytes, reading lazily loaded weights once and dropping
    them again (peak RSS stays one tensor above what was loaded before)."""

    def __init__(self):
        self.memo: dict[int, tuple] = {}

    def __call__(self, w) -> tuple:
        if id(w) not in self.memo:
            was = getattr(w, "loaded", True)
            h = hashlib.blake2b(digest_size=16)
            for t in _tensors(w):
                h.update(_raw(t).numpy())
            if not was:
                w.release()
            self.memo[id(w)] = (skeleton(w), h.hexdigest(), w)  # w kept alive: ids stay unique
        return self.memo[id(w)][:2]

    def fingerprint(self, obj) -> object:
        return _walk_key(obj, self)


def _leaves(obj) -> list:
    out = []
    _walk_key(obj, lambda w: out.append(w))
    return out


def bit_equal(a, b) -> bool:
    if skeleton(a) != skeleton(b):
        return False
    for x, y in zip(_leaves(a), _leaves(b)):
        if x is not y and not all(torch.equal(_raw(s), _raw(t)) for s, t in zip(_tensors(x), _tensors(y))):
            return False
    return True


def _dense(obj) -> bool:
    return not any(isinstance(w, QuantWeight) for w in _leaves(obj))


def average(a, b):
    """The elementwise mean of two subtrees with equal skeletons (new weights, same dtypes)."""
    if a is b:
        return a
    if isinstance(a, Weight):
        return Weight(((a.float() + b.float()) / 2).to(a.data.dtype))
    if dataclasses.is_dataclass(a):
        return type(a)(**{f.name: average(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)})
    if isinstance(a, list):
        return [average(x, y) for x, y in zip(a, b)]
    return a


def compact(ir: Model) -> None:
    """Drop blocks no depth runs and renumber `layers` (order of first use kept)."""
    keep = sorted(set(ir.layers))
    new = {old: i for i, old in enumerate(keep)}
    ir.blocks = [ir.blocks[i] for i in keep]
    ir.layers = [new[b] for b in ir.layers]


# --- lossless ------------------------------------------------------------------------------------

def share_identical(ir: Model) -> list[dict]:
    """Collapse bit-identical blocks, then bit-identical FFNs; returns what was shared."""
    digests, shared = _Digests(), []
    depths = lambda bi: [d for d, b in enumerate(ir.layers) if b == bi]  # noqa: E731
    seen: dict[object, list[int]] = {}
    remap: dict[int, int] = {}
    for i, b in enumerate(ir.blocks):
        fp = digests.fingerprint(b)
        j = next((j for j in seen.get(fp, []) if bit_equal(ir.blocks[j], b)), None)
        if j is None:
            seen.setdefault(fp, []).append(i)
        else:
            remap[i] = j
            shared.append({"kind": "block", "depths": depths(j) + depths(i)})
    if remap:
        ir.layers = [remap.get(b, b) for b in ir.layers]
        compact(ir)
    seen_ffn: dict[object, list[int]] = {}
    for i, b in enumerate(ir.blocks):
        fp = digests.fingerprint(b.ffn)
        j = next((j for j in seen_ffn.get(fp, []) if bit_equal(ir.blocks[j].ffn, b.ffn)), None)
        if j is None:
            seen_ffn.setdefault(fp, []).append(i)
        elif ir.blocks[j].ffn is not b.ffn:
            b.ffn = ir.blocks[j].ffn
            shared.append({"kind": "ffn", "depths": depths(j) + depths(i)})
    return shared


# --- lossy: candidates, errors, selection --------------------------------------------------------

def candidates(ir: Model, mode: str) -> list[int]:
    """Depths d whose pair (d, d+1) may share: distinct, same structure, each used once."""
    uses: dict[int, int] = {}
    for d in range(ir.n_layers):
        k = id(ir.block_at(d)) if mode == "block" else id(ir.block_at(d).ffn)
        uses[k] = uses.get(k, 0) + 1
    out = []
    for d in range(ir.n_layers - 1):
        x, y = pair_parts(ir, d, mode)
        if x is not y and uses[id(x)] == 1 and uses[id(y)] == 1 and skeleton(x) == skeleton(y):
            out.append(d)
    return out


def pair_parts(ir: Model, d: int, mode: str) -> tuple:
    """What a merge of pair (d, d+1) chooses between: the two blocks, or their two FFNs."""
    a, b = ir.block_at(d), ir.block_at(d + 1)
    return (a, b) if mode == "block" else (a.ffn, b.ffn)


def merged(x, y, merge: str):
    return x if merge == "first" else y if merge == "second" else average(x, y)


def variant(ir: Model, d: int, mode: str, merge: str) -> tuple[Block, Block]:
    """The blocks depths d and d+1 would run after merging their pair."""
    a, b = ir.block_at(d), ir.block_at(d + 1)
    if mode == "block":
        m = merged(a, b, merge)
        return m, m
    f = merged(a.ffn, b.ffn, merge)
    return (a if f is a.ffn else dataclasses.replace(a, ffn=f)), (b if f is b.ffn else dataclasses.replace(b, ffn=f))


def _consumer(ir: Model, depth: int):
    return ir.block_at(depth).attn_norm if depth < ir.n_layers else ir.final_norm


@torch.no_grad()
def pair_error(ir: Model, d: int, blocks: tuple[Block, Block], xs: list[torch.Tensor]) -> float:
    """Relative error at depth d+2, through the next consumer's RMSNorm."""
    pos = torch.arange(xs[0].shape[1])
    a, b = blocks
    y = xs[d + 1] if a is ir.block_at(d) else reference.block(a, xs[d], pos)
    y = reference.block(b, y, pos)
    norm = _consumer(ir, d + 2)
    ref = reference.rms_norm(xs[d + 2], norm)
    return float((reference.rms_norm(y, norm) - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def select(errors: dict[int, float], n_layers: int, k: int) -> list[int]:
    """Non-overlapping pairs (d, d+1): the most pairs <= k, then the smallest summed error."""
    inf = float("inf")
    best = [[inf] * (k + 1) for _ in range(n_layers + 1)]
    back: list[list] = [[None] * (k + 1) for _ in range(n_layers + 1)]
    best[0][0] = 0.0
    for i in range(n_layers):
        for j in range(k + 1):
            if best[i][j] == inf:
                continue
            if best[i][j] < best[i + 1][j]:  # depth i not in a pair
                best[i + 1][j], back[i + 1][j] = best[i][j], (i, j, None)
            if i in errors and j < k and best[i][j] + errors[i] < best[i + 2][j + 1]:
                best[i + 2][j + 1], back[i + 2][j + 1] = best[i][j] + errors[i], (i, j, i)
    j = max(j for j in range(k + 1) if best[n_layers][j] < inf)
    i, out = n_layers, []
    while i > 0:
        i, j, d = back[i][j]
        if d is not None:
            out.append(d)
    return sorted(out)


def apply(ir: Model, d: int, mode: str, merge: str) -> None:
    a_idx, b_idx = ir.layers[d], ir.layers[d + 1]
    a, b = ir.blocks[a_idx], ir.blocks[b_idx]
    if mode == "block":
        if merge == "second":
            ir.layers[d] = b_idx
        else:
            if merge == "average":
                ir.blocks[a_idx] = average(a, b)
            ir.layers[d + 1] = a_idx
        return
    a.ffn = b.ffn = merged(a.ffn, b.ffn, merge)


@torch.no_grad()
def hidden_states(ir: Model, ids: torch.Tensor) -> list[torch.Tensor]:
    pos = torch.arange(ids.shape[1])
    xs = [reference.embed(ir, ids)]
    for d in range(ir.n_layers):
        xs.append(reference.block(ir.block_at(d), xs[-1], pos))
    return xs


@torch.no_grad()
def proxy(ir: Model, ids: torch.Tensor, final_before: torch.Tensor) -> dict:
    """Perplexity on the calibration tokens before/after, KL(before || after) and top-1."""
    nll_b = nll_a = kl = 0.0
    agree = count = 0
    for i in range(len(ids)):  # one sequence at a time: [T, vocab] logits, not [N, T, vocab]
        lb = F.log_softmax(reference.head(ir, final_before[i]).float()[:-1], -1)
        la = F.log_softmax(reference.forward(ir, ids[i:i + 1])[0].float()[:-1], -1)
        tgt = ids[i, 1:, None]
        nll_b += float(-lb.gather(1, tgt).sum())
        nll_a += float(-la.gather(1, tgt).sum())
        kl += float((lb.exp() * (lb - la)).sum())
        agree += int((lb.argmax(-1) == la.argmax(-1)).sum())
        count += len(tgt)
    return {"calib_ppl_before": round(math.exp(nll_b / count), 4), "calib_ppl_after": round(math.exp(nll_a / count), 4),
            "calib_kl": round(kl / count, 6), "calib_top1": round(agree / count, 4), "calib_tokens": count}


@register
class ShareLayers(Pass):
    name = "arch.share_layers"
    Options = ShareOptions

    def run(self, ir: Model) -> PassResult:
        o = self.options
        before = weight_bytes(ir)
        if o.mode == "lossless":
            shared = share_identical(ir)
            return PassResult(ir, bool(shared), {
                "mode": "lossless", "pairs": len(shared), "shared": shared, "blocks": len(ir.blocks),
                "weight_bytes_saved": before - weight_bytes(ir), "calib_error": 0.0})
        k = int(o.budget * ir.n_layers + 1e-9)
        cands = candidates(ir, o.mode)
        info = {"mode": o.mode, "budget": o.budget, "max_pairs": k, "candidates": len(cands)}
        if k == 0 or not cands:
            why = "the budget allows no pair" if k == 0 else "no adjacent pair has the same structure, used once"
            return PassResult(ir, False, {**info, "pairs": 0, "shared": [], "weight_bytes_saved": 0, "note": why})
        merges = ["first", "second", "average"] if o.merge == "auto" else [o.merge]
        quantized = [d for d in cands if not _dense(list(pair_parts(ir, d, o.mode)))]
        if o.merge == "average" and quantized:
            raise SlmcError(f"merge=average needs float weights; depth {quantized[0]}'s pair is quantized "
                            "(share before quantizing, or use merge=auto)", WHERE)
        ids, t_calib = o.tokens(ir)
        t1 = time.perf_counter()
        xs = hidden_states(ir, ids)
        errs: dict[int, dict[str, float]] = {}
        for d in cands:
            ok = [m for m in merges if m != "average" or d not in quantized]
            errs[d] = {m: pair_error(ir, d, variant(ir, d, o.mode, m), xs) for m in ok}
        best = {d: min(e, key=e.get) for d, e in errs.items()}
        chosen = select({d: errs[d][best[d]] for d in cands}, ir.n_layers, k)
        shared = [{"kind": o.mode, "depths": [d, d + 1], "merge": best[d], "error": round(errs[d][best[d]], 6),
                   "errors": {m: round(v, 6) for m, v in errs[d].items()}} for d in chosen]
        for d in chosen:
            apply(ir, d, o.mode, best[d])
        compact(ir)
        final_before = xs[-1]
        del xs
        wins: dict[str, int] = {}
        for d in cands:
            wins[best[d]] = wins.get(best[d], 0) + 1
        info.update({
            "pairs": len(chosen), "shared": shared, "blocks": len(ir.blocks),
            "weight_bytes_saved": before - weight_bytes(ir),
            "calib_error": round(sum(s["error"] for s in shared) / max(1, len(shared)), 6),
            "merge_wins": dict(sorted(wins.items())),
            "calibration": o.describe(),
            "calibration_seconds": round(t_calib, 2), "search_seconds": round(time.perf_counter() - t1, 2)})
        info.update(proxy(ir, ids, final_before))
        return PassResult(ir, bool(chosen), info)
