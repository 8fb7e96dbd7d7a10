"""quant.rotate: rotate the residual stream (R1) and the value/output heads (R2) offline,
so int4 weights see no outlier channels (QuaRot, Ashkboos et al. 2024; SpinQuant R1/R2,
Liu et al. 2024). The rotations are fused into the weights: the artifact runs the same ops
as before and every target lowers it unchanged. Run it before quant.rtn/awq/gptq.

1. Fold: every RMSNorm scale moves into the linears that read its output (W <- W diag(w),
   w + 1 for Gemma's unit-offset norms) and the norm keeps a unit scale. An RMSNorm with a
   unit scale commutes with any orthogonal R (rms(x R) = rms(x)); a per-channel scale does
   not, which is why folding comes first.
2. R1 (hidden x hidden): the residual stream x becomes x R1. Embedding rows E <- E R1;
   every linear that reads the stream (q/k/v or qkv, gate/up or gate_up, MoE router,
   shared-expert gate, output head) W <- W R1; every linear that writes it (o, down) W <-
   R1^T W and bias b <- b R1.
3. R2 (head_dim x head_dim, one per head size): each value head v_h <- v_h R2 (v's rows, bias
   included) and o's input columns of every query head <- W_o,h R2, so the attention output
   of each head, a weighted sum of values, carries R2 into o and out again. q and k are
   untouched, so RoPE, q/k norms, soft-capping and sliding windows are unaffected.

rotate=false stops after step 1: the norm scales folded into the linears (the head untied as
below), nothing rotated; exact in float. It measures what folding alone does to rounding,
since the fold is what an exact rotation needs first (bench/quant_rotate.py's fold-only rows);
kind, seed and heads then do nothing.

R is a Hadamard matrix / sqrt(n) with seeded random signs where one of order n is built
(compiler/hadamard.py: Sylvester, Paley I/II and Kronecker products; SmolLM2's 576 =
8 x 72), else a seeded random orthogonal matrix (kind=random: always). Exact in float: the
weights are transformed in float64 and stored as float32.

Requires float weights (IR property float_weights: a rotation must precede rounding, so
quant.rtn/awq/gptq come after it). Refused, with the reason, because of the model: Gemma
2/3's post-attention/post-FFN norms (they scale the attention/FFN output per channel just
before it joins the stream, and no linear follows them to carry R1; no obstacle to
rotate=false); a tied embedding/head whose final norm's scale is not uniform (the scale
would have to fold into the one shared table; untie=true gives the head its own vocab x
hidden table: embed E R1, head E diag(w) R1); a linear shared by blocks whose norms differ
(one folded weight cannot carry two scales). A tied head with a uniform final norm stays
tied (the table becomes E R1 for both uses; the norm's uniform scale commutes with R1).
Biases rotate with their rows (RMSNorm has no mean or bias, so no bias is ever in the way);
q/k norms act after q/k, which R1 and R2 leave as they are. Shared blocks and FFNs are
rotated once. A quantized KV cache (int8/float16) stores the rotated values, so only its
rounding changes.

Before:                                   After (untie=true on a tied model):
  embed: f32[49152,576]                     embed: f32[49152,576]         (E R1)
  attn_norm: rms(eps=1e-05) f32[576]        attn_norm: rms(eps=1e-05) f32[576]   (ones)
  q: f32[576,576]                           q: f32[576,576]               (W diag(w) R1)
  v: f32[192,576]  o: f32[576,576]          v: (R2 per head) o: (R1^T W_o R2 per head)
  lm_head: tied to embed                    lm_head: f32[49152,576]       (E diag(w_final) R1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.hadamard import rotation
from ..compiler.ir import MLP, Attention, Block, Linear, Model, MoE, Norm, Weight
from ..compiler.pass_manager import Pass, PassResult, register
from ..compiler.spill import Spill, spill_tree
from ..errors import SlmcError

KINDS = ("hadamard", "random")
WHERE = "--pass quant.rotate"


@dataclass(frozen=True)
class RotateOptions:
    kind: str = "hadamard"  # hadamard (random where no Hadamard of that order is built) | random
    seed: int = 0  # the Hadamard's random signs, or the random matrices
    heads: bool = True  # R2 on the value/output heads as well as R1 on the residual stream
    untie: bool = False  # a tied head whose final norm is not uniform gets its own table
    rotate: bool = True  # false: fold the norm scales only (step 1), no R1/R2

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}: one of {', '.join(KINDS)}")


def _scale(n: Norm) -> torch.Tensor:
    w = n.weight.data.double()
    return w + 1.0 if n.unit_offset else w


def _reset(n: Norm) -> None:
    """A unit scale (stored as 0 for a unit-offset norm)."""
    n.weight = Weight(torch.full(n.weight.shape, 0.0 if n.unit_offset else 1.0, dtype=torch.float32))


def _uniform(n: Norm) -> bool:
    s = _scale(n)
    return bool((s == s[0]).all())


def _tied(ir: Model) -> bool:
    return ir.lm_head is None or ir.lm_head.weight is ir.embed


def _set(lin: Linear, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
    lin.weight = Weight(w.float().contiguous())
    if b is not None:
        lin.bias = Weight(b.float().contiguous())


def _distinct(items):
    seen = set()
    for x in items:
        if id(x) not in seen:
            seen.add(id(x))
            yield x


def _blocks(ir: Model) -> list[Block]:
    return list(_distinct(ir.blocks[i] for i in ir.layers))


def _mlp_parts(f: MLP | MoE) -> tuple[list[Linear], list[Linear]]:
    """(linears reading the normed stream, linears writing the stream) of an FFN."""
    mlps = [f] if isinstance(f, MLP) else f.experts + ([f.shared] if f.shared is not None else [])
    reads = [l for m in mlps for l in (m.gate_up,) if l is not None]
    reads += [l for m in mlps for l in (m.gate, m.up) if l is not None]
    if isinstance(f, MoE):
        reads += [f.router] + ([f.shared_gate] if f.shared_gate is not None else [])
    return reads, [m.down for m in mlps]


def _attn_reads(a: Attention) -> list[Linear]:
    return [a.qkv] if a.fused else [a.q, a.k, a.v]


def refusal(ir: Model, o: RotateOptions) -> str | None:
    """Why this model cannot be rotated (or, rotate=false, folded) exactly, or None. That the
    weights are still float is `requires` (pipeline order, checked by the pass manager)."""
    for i, b in enumerate(ir.blocks if o.rotate else ()):
        for nm in ("post_attn_norm", "post_ffn_norm"):
            if getattr(b, nm) is not None:
                return (f"blocks.{i}.{nm}: a norm after the attention/FFN output (Gemma 2/3) scales the "
                        f"residual write per channel, which does not commute with a rotation")
    if _tied(ir) and not _uniform(ir.final_norm) and not o.untie:
        return ("the embedding is tied to the output head and the final norm's scale is not uniform: it "
                "cannot fold into the shared table (untie=true gives the head its own vocab x hidden table)")
    seen: dict[int, tuple[torch.Tensor, str]] = {}
    for i, b in enumerate(ir.blocks):
        pairs = [(l, b.attn_norm, "attn") for l in _attn_reads(b.attn)]
        pairs += [(l, b.ffn_norm, "ffn") for l in _mlp_parts(b.ffn)[0]]
        for lin, norm, what in pairs:
            s = _scale(norm)
            prev = seen.setdefault(id(lin), (s, f"blocks.{i}"))
            if prev[0] is not s and not torch.equal(prev[0], s):
                return (f"blocks.{i}.{what}: a linear shared with {prev[1]} reads norms with different "
                        f"scales; one folded weight cannot carry both")
    return None


def fold_norms(ir: Model) -> int:
    """Move every RMSNorm's scale into the linears reading it (exact). A tied head whose
    final norm is not uniform becomes an untied head; a uniform one stays as it is."""
    folds: dict[int, tuple[Linear, torch.Tensor]] = {}
    norms: list[Norm] = []
    for b in _blocks(ir):
        for norm, reads in ((b.attn_norm, _attn_reads(b.attn)), (b.ffn_norm, _mlp_parts(b.ffn)[0])):
            norms.append(norm)
            for lin in reads:
                folds.setdefault(id(lin), (lin, _scale(norm)))
    if not _tied(ir):
        folds[id(ir.lm_head)] = (ir.lm_head, _scale(ir.final_norm))
        norms.append(ir.final_norm)
    elif not _uniform(ir.final_norm):
        bias = ir.lm_head.bias if ir.lm_head is not None else None
        ir.lm_head = Linear(ir.embed, bias)
        folds[id(ir.lm_head)] = (ir.lm_head, _scale(ir.final_norm))
        norms.append(ir.final_norm)
    for lin, s in folds.values():
        _set(lin, lin.weight.data.double() * s[None, :])
    for n in _distinct(norms):
        _reset(n)
    return len(folds)


def rotate_stream(ir: Model, r1: torch.Tensor) -> int:
    """x -> x R1 everywhere the residual stream is read or written (norms must be unit)."""
    tied = _tied(ir)
    ir.embed = Weight((ir.embed.data.double() @ r1).float())
    if tied and ir.lm_head is not None:  # a head node on the embedding's own table stays on it
        ir.lm_head.weight = ir.embed
    reads: list[Linear] = [] if tied else [ir.lm_head]
    writes: list[Linear] = []
    for b in _blocks(ir):
        reads += _attn_reads(b.attn)
        writes.append(b.attn.o)
        r, w = _mlp_parts(b.ffn)
        reads += r
        writes += w
    reads, writes = list(_distinct(reads)), list(_distinct(writes))
    for lin in reads:
        _set(lin, lin.weight.data.double() @ r1)
    for lin in writes:
        b = lin.bias.data.double() @ r1 if lin.bias is not None else None
        _set(lin, r1.T @ lin.weight.data.double(), b)
    return len(reads) + len(writes) + 1


def rotate_heads(ir: Model, r2s: dict[int, torch.Tensor]) -> int:
    """Each value head v_h -> v_h R2 and o's columns of every query head W_o,h -> W_o,h R2
    (r2s: head_dim -> R2)."""
    n = 0
    for a in _distinct(b.attn for b in _blocks(ir)):
        d = a.head_dim
        r2 = r2s[d]
        v = a.qkv if a.fused else a.v
        lo = (a.n_heads + a.n_kv_heads) * d if a.fused else 0  # v's first row
        w = v.weight.data.double().clone()
        rows = w[lo:lo + a.n_kv_heads * d].view(a.n_kv_heads, d, -1)
        w[lo:lo + a.n_kv_heads * d] = (r2.T @ rows).reshape(a.n_kv_heads * d, -1)
        b = None
        if v.bias is not None:
            b = v.bias.data.double().clone()
            b[lo:lo + a.n_kv_heads * d] = (b[lo:lo + a.n_kv_heads * d].view(a.n_kv_heads, d) @ r2).reshape(-1)
        _set(v, w, b)
        wo = a.o.weight.data.double()
        cols = wo.view(wo.shape[0], a.n_heads, d) @ r2
        _set(a.o, cols.reshape(wo.shape[0], -1))
        n += 1
    return n


def _spilled(ir: Model) -> dict:
    """The rewritten floats to scratch space (compiler/spill.py): the quantizer after this pass
    reads them back block by block instead of finding the whole model resident."""
    n = spill_tree(ir, Spill(WHERE))
    return {"spilled_mib": round(n / 2**20, 1)} if n else {}


@register
class QuantRotate(Pass):
    name = "quant.rotate"
    Options = RotateOptions
    requires = ("float_weights",)

    def run(self, ir: Model) -> PassResult:
        o = self.options
        why = refusal(ir, o)
        if why:
            raise SlmcError(why, WHERE)
        was_tied = _tied(ir)
        if not o.rotate:
            folded = fold_norms(ir)
            return PassResult(ir, True, {"norms_folded_into": folded,
                                         "untied_head": was_tied and ir.lm_head is not None, **_spilled(ir)})
        gen = torch.Generator().manual_seed(o.seed)
        r1, how1 = rotation(ir.hidden_size, o.kind, gen)
        folded = fold_norms(ir)
        n = rotate_stream(ir, r1)
        info = {"r1": f"{how1} ({ir.hidden_size})", "norms_folded_into": folded,
                "untied_head": was_tied and ir.lm_head is not None}
        if o.heads:
            r2s = {}
            for d in sorted({b.attn.head_dim for b in _blocks(ir)}):
                r2s[d], how2 = rotation(d, o.kind, gen)
                info[f"r2_{d}"] = f"{how2} ({d})"
            info["attentions_rotated"] = rotate_heads(ir, r2s)
        info["linears_rotated"] = n
        return PassResult(ir, True, {**info, **_spilled(ir)})
