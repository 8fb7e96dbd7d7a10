"""quant.gptq: Hessian-based groupwise weight quantization (GPTQ, Frantar et al. 2022).

Sequential, one block at a time in depth order. Calibration tokens (the user's text via
calib=FILE;FILE, else data-free samples from the model, see compiler/calib.py) run
through the blocks already quantized; inside a block every stage's input feeds
H = 2/n X^T X for the linears that read it (q/k/v share one H, all gate/up share one, o and
each down their own), the stage's linears are quantized, and only then does the stage
run, so later stages see the quantized earlier ones. Per H, the linears are quantized
together (GPTQ treats rows independently): damping (damp * mean diag H), dead inputs
zeroed, the upper Cholesky factor of H^-1, column-by-column rounding with error feedback,
lazy updates every block_size columns (rounded to whole groups), and per-group
scales/zeros from QuantScheme computed from the error-updated weights as each group
starts. act_order=true visits columns by decreasing H diagonal and uses static groups
(scales from the original weight's contiguous groups), so the result is still the IR's
plain groupwise QuantWeight. clip=true picks each (row, group)'s scale among range shrinks
(1, 0.95, ..., 0.55) by its rounding error weighted by the group's Hessian block (AWQ's clip
search, on GPTQ's H): the full range spends int4's few codes on one outlier. Memory stays one block deep: the calibration activations
at one depth plus that block's intermediate stages. A block used at several depths is
quantized once, at its first depth. MoE experts see every calibration token (not only
those routed to them), so each expert's H is well conditioned. With embed_bits the embedding
is rounded (RTN) before the blocks, which are calibrated on it; with head_bits the head is
quantized last, by GPTQ on the final norm's output (RTN there was most of int8da-int4w-g32's
loss: bench/results/quant_split.md), and a tied table at one scheme for both stays one table
(share_tied: the embedding takes the head's codes).

Before:                                  After (bits=4, group_size=32):
  q: f32[576,576]                          q: sint4g32[576,576](gptq)
  mlp(silu): gate f32[1536,576] ...        mlp(silu): gate sint4g32[1536,576](gptq) ...
  lm_head: tied to embed                   lm_head: tied to embed        (head_bits=0)
  with embed_bits=4,head_bits=4:           embed: sint4g32[49152,576](gptq), the head's codes
                                           lm_head: sint4g32[49152,576](gptq)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler import reference
from ..compiler.calib import Site, gram, run_block
from ..compiler.ir import Model, QuantWeight
from ..compiler.pass_manager import PassResult, register
from ..compiler.quant import QuantScheme, group_params, quantize_codes
from ..compiler import spill as _spill
from ..compiler.spill import Spill, spill_codes
from ..errors import SlmcError
from ._options import CalibOptions, QuantOptions
from ._quant import QuantPass, embedded, head_scheme, quantize_ends, set_act_bits, spilled


@dataclass(frozen=True)
class GPTQOptions(CalibOptions, QuantOptions):
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    # on by default: bench/results/quant.md measured int4 g32 without it 7 points worse (+15.2 vs +8.2 %)
    act_order: bool = True
    block_size: int = 128  # columns per lazy batch update
    # true: each (row, group)'s scale from the range shrink (1, 0.95, ..., 0.55) whose rounding
    # error e weighs least under the group's Hessian block (e H_gg e^T); false: the full range.
    # On by default: bench/results/quant_calib.md, data-free int4 g32 +13.0 % vs +23.7 % without
    clip: bool = True
    # a tied table quantized at one scheme for both ends stays one table (LiteRT stores it once):
    # the embedding takes the head's GPTQ codes. Measured on SmolLM2-135M with int8da-int4w-g32:
    # +17.9 % perplexity shared against +17.0 % with an RTN embedding of its own (head RTN: +29.9 %)
    share_tied: bool = True


N_SHRINK = 10  # clipping ratios 1, 0.95, ..., 0.55 (as quant.awq's)
HEAD_ROWS = 8192  # head rows per GPTQ call


# elements searched together (2048 rows of 2048): the search's temporaries are ~6 fp32 copies of
# them, so a 2048 x 8192 down projection goes 512 rows at a time (400 MiB at once otherwise)
CLIP_ELEMS = 2048 * 2048


def clipped_params(W: torch.Tensor, Hb: torch.Tensor, s: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zeros) per [rows, cols // g] group: the shrunken range whose RTN error of W
    is smallest under Hb [cols // g, g, g] (the diagonal blocks of H). Rows are independent:
    searched CLIP_ELEMS at a time (a 16384-row gate+up was ~0.7 GB of temporaries at once)."""
    step = max(1, CLIP_ELEMS // max(1, W.shape[1]))
    if len(W) <= step:
        return _clipped_params(W, Hb, s)
    parts = [_clipped_params(W[r:r + step], Hb, s) for r in range(0, len(W), step)]
    return (torch.cat([p[0] for p in parts]),
            torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None)


def _clipped_params(W: torch.Tensor, Hb: torch.Tensor, s: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, cols = W.shape
    g = s.group_size
    Wg = W.view(rows, cols // g, g)
    hi = Wg.abs().amax(-1, keepdim=True) if s.symmetric else Wg.amax(-1, keepdim=True)
    lo = -hi if s.symmetric else Wg.amin(-1, keepdim=True)
    best_err = torch.full((rows, cols // g), float("inf"))
    best_sc = best_z = None
    for i in range(N_SHRINK):
        r = 1 - i / 20
        sc, z = group_params(torch.clamp(Wg, lo * r, hi * r).reshape(rows, cols), s)
        zz = z.repeat_interleave(g, 1) if z is not None else 0.0
        deq = (quantize_codes(W, sc, z, s).float() - zz) * sc.repeat_interleave(g, 1)
        E = (deq - W).view(rows, -1, g).transpose(0, 1)  # [ng, rows, g]
        err = (torch.bmm(E, Hb) * E).sum(-1).T
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_sc = sc if best_sc is None else torch.where(better, sc, best_sc)
        if z is not None:
            best_z = z if best_z is None else torch.where(better, z, best_z)
    # contiguous: `err` is a transposed view, and torch.where follows its strides
    return best_sc.contiguous(), (best_z.contiguous() if best_z is not None else None)


def _blocks(H: torch.Tensor, g: int) -> torch.Tensor:
    n = H.shape[0] // g
    return torch.stack([H[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(n)])


# elements per block of the in-place permutation (16 MiB of fp32 rows at a time)
BLOCK_ELEMS = 1 << 22
TILE = 512  # the in-place transpose's square tiles (1 MiB of fp32)


def _transpose_(H: torch.Tensor) -> None:
    """Square row-major H transposed in place, a pair of tiles at a time (exact: copies only)."""
    n = len(H)
    for i in range(0, n, TILE):
        d = H[i:i + TILE, i:i + TILE]
        d.copy_(d.T.clone())
        for j in range(i + TILE, n, TILE):
            a, c = H[i:i + TILE, j:j + TILE], H[j:j + TILE, i:i + TILE]
            t = a.clone()
            a.copy_(c.T)
            c.copy_(t.T)


def _permute_columns_(H: torch.Tensor, perm: torch.Tensor) -> None:
    step = max(1, BLOCK_ELEMS // H.shape[1])
    for r in range(0, len(H), step):
        H[r:r + step] = H[r:r + step][:, perm]


def _column_major_(H: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """H (with perm: H[perm][:, perm]) written column by column into H's own buffer, returned as
    that column-major view. LAPACK factors a column-major matrix where it lies; torch copies a
    row-major one first, and H[perm][:, perm] was two more copies (each 256 MiB at 8192 wide).
    Exact (copies only), and H need not be symmetric to the bit (calib.gram's row blocks)."""
    if perm is not None:
        _permute_columns_(H, perm)  # H[:, perm]
    _transpose_(H)  # (H[:, perm])^T = H^T[perm]
    if perm is not None:
        _permute_columns_(H, perm)  # H^T[perm][:, perm]: the permuted H, column by column
    return H.mT


def _hinv_upper(A: torch.Tensor, damp: float, scratch: Spill) -> torch.Tensor:
    """Upper Cholesky factor of (A + damp * mean(diag A) * I)^-1; more damping if needed.
    A: column-major (_column_major_), overwritten: both factorizations and the inverse run in
    its buffer, and the factor returned is A. An 8192-wide H is 256 MiB, and H with one factor,
    then two factors, were held at once (before that also a damped copy). A's bytes wait in
    `scratch` (a file, spill.py) for the rare retry after a factorization fails."""
    mean = float(A.diagonal().mean())
    diag = A.diagonal().clone()  # undamped: each try damps it afresh
    saved = scratch.mapped(A.mT)  # A.mT: the buffer as it lies (row-major)
    info = torch.zeros((), dtype=torch.int32)
    for k in range(6):  # damp, then 10x more each time a factorization fails
        d = damp * 10**k if damp > 0 else (1e-6 * 10 ** (k - 1) if k else 0.0)
        if k:  # the failed try overwrote A
            A.mT.copy_(saved)
            _spill.let_go(_spill.file_ranges([saved]))
        A.diagonal().copy_(diag).add_(mean * d)
        _, bad = torch.linalg.cholesky_ex(A, out=(A, info))
        if int(bad) != 0:
            continue
        torch.cholesky_inverse(A, out=A)
        _, bad = torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
        if int(bad) == 0:
            return A
    raise SlmcError("the calibration Hessian is not positive definite even with heavy damping", "quant.gptq")


def gptq(W: torch.Tensor, H: torch.Tensor, s: QuantScheme, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False, clip: bool = False,
         overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize W [rows, cols] against H [cols, cols]; returns codes, scales, zeros (or None).
    overwrite: W and H are the caller's temporaries, used as the work arrays (no copies); pass
    them inline, holding no reference. H is permuted, factored and inverted in its own buffer,
    and the factor then waits in scratch space (an 8192-wide H is 256 MiB: the caller's, a
    permuted copy, a damped one and a factor were 1 GiB at once)."""
    own_w, own_h = overwrite or W.dtype != torch.float32, overwrite or H.dtype != torch.float32
    W, H = W.float(), H.float()
    if not own_w:
        W = W.clone()
    rows, cols = W.shape
    s = s.at(cols)
    g = s.group_size
    dead = H.diagonal() == 0
    if bool(dead.any()):
        if not own_h:
            H, own_h = H.clone(), True
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    perm = None
    if act_order:
        # static groups: the original contiguous groups
        scales, zeros = clipped_params(W, _blocks(H, g), s) if clip else group_params(W, s)
        perm = torch.argsort(H.diagonal(), descending=True)
        W = W[:, perm]
        group_of = (perm // g).tolist()
    else:
        scales = torch.zeros(rows, cols // g)
        zeros = None if s.symmetric else torch.zeros(rows, cols // g)
    Hb = _blocks(H, g) if clip and not act_order else None  # the loop's group blocks: H goes below
    scratch = Spill("--pass quant.gptq")
    U = _hinv_upper(_column_major_(H if own_h else H.clone(), perm), damp, scratch)
    del H
    # U to scratch space, its buffer freed: the loop reads one block's rows at a time, and each
    # block's pages are let go after it (a 256 MiB factor held through the loop otherwise)
    U = scratch.mapped(U.mT).mT
    u_pages = _spill.file_ranges([U])
    # the codes in their own dtype from the start (an fp32 table would be as big as W)
    codes = torch.zeros(rows, cols, dtype=s.code_dtype)
    bs = max(g, block_size // g * g)  # whole groups per lazy block
    sc = z = None
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err = torch.zeros(rows, i2 - i1)
        for i in range(i2 - i1):
            c = i1 + i
            if act_order:
                k = group_of[c]
                sc, z = scales[:, k], (zeros[:, k] if zeros is not None else 0.0)
            elif c % g == 0:  # the group's range after the error feedback so far
                Wc = W1[:, i:i + g]
                gs, gz = clipped_params(Wc, Hb[c // g][None], s) if clip else group_params(Wc, s)
                scales[:, c // g] = gs[:, 0]
                if zeros is not None:
                    zeros[:, c // g] = gz[:, 0]
                sc, z = gs[:, 0], (gz[:, 0] if gz is not None else 0.0)
            w = W1[:, i]
            q = torch.clamp(torch.round(w / sc + z), s.qmin, s.qmax)
            codes[:, c] = q
            err = (w - (q - z) * sc) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]
        _spill.let_go(u_pages)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros


@register
class QuantGPTQ(QuantPass):
    name = "quant.gptq"
    Options = GPTQOptions

    def run(self, ir: Model) -> PassResult:
        o = self.options
        if not o.damp >= 0 or o.block_size < 1:
            raise SlmcError(f"need damp >= 0 and block_size >= 1 (got {o.damp}, {o.block_size})", "--pass quant.gptq")
        s = self.scheme(ir)
        ids, t_calib = o.tokens(ir)
        # the embedding first, so the blocks are calibrated on it; the head after them, by GPTQ on
        # what it reads (RTN there cost int8da-int4w-g32 most of its loss: bench/results/quant_split.md)
        share = (ir.lm_head is None and o.share_tied and o.head_bits == o.embed_bits > 0
                 and not isinstance(ir.embed, QuantWeight))
        codes_file = Spill(f"--pass {self.name}")  # each finished block's codes (issue 17)
        n = quantize_ends(ir, o, "rtn", head=False, spill=codes_file)
        memo: dict[int, tuple] = {}
        x = embedded(ir, ids)  # the table's pages let go after the lookup
        done: set[int] = set()
        for d in range(ir.n_layers):
            bi = ir.layers[d]
            hook = (lambda site: None) if bi in done else (lambda site: self._site(site, s, memo))
            x = run_block(ir.blocks[bi], x, hook)
            done.add(bi)
            # the block's codes to scratch space, its checkpoint pages let go: it is done
            spill_codes(ir.blocks[bi], codes_file)
        n += len(memo) + self._head(ir, x, codes_file)
        if share and isinstance(ir.lm_head.weight, QuantWeight):  # one table again: the head's codes
            w = ir.lm_head.weight
            # a copy of its own in scratch space (not a heap clone: 262 MiB at a 128k vocabulary)
            ir.embed = QuantWeight(codes=codes_file.copy(w.codes), scales=w.scales.clone(), bits=w.bits,
                                   zeros=w.zeros.clone() if w.zeros is not None else None,
                                   group_size=w.group_size, symmetric=w.symmetric, algorithm="gptq")
        set_act_bits(ir, o, "--pass quant.gptq")
        return PassResult(ir, n > 0, {
            "quantized": n, "scheme": f"{'s' if o.symmetric else 'a'}int{o.bits}g{o.group_size}",
            "calibration": o.describe(),
            "calibration_seconds": round(t_calib, 2)})

    def _head(self, ir: Model, x: torch.Tensor, codes_file: Spill) -> int:
        """GPTQ for a head still float at head_bits, against the final norm's output; in chunks of
        rows (independent in GPTQ), each written into one table (no list of parts plus their cat:
        a 128k-row vocabulary's codes are 262 MiB), which then goes to scratch space."""
        o, lin = self.options, ir.lm_head
        if not o.head_bits or lin is None or isinstance(lin.weight, QuantWeight):
            return 0
        s = head_scheme(ir, o)
        H = gram(reference.rms_norm(x, ir.final_norm)).mul_(2)  # in place: no second copy
        old = lin.weight
        if old.loaded:  # each chunk is made fp32 in gptq(), not the whole table at once
            W = old.data
        else:  # copied into scratch space a chunk of rows at a time, each chunk's pages let go
            # after its GPTQ: a checkpoint's table read whole is heap (0.5 GB of bf16 at 1B)
            W = codes_file.mapped_weight(old)
        rows, cols = W.shape
        g = s.at(cols).group_size
        codes = torch.empty(rows, cols, dtype=s.code_dtype)
        scales = torch.empty(rows, cols // g)
        zeros = None if s.symmetric else torch.empty(rows, cols // g)
        for r in range(0, rows, HEAD_ROWS):
            c, sc, z = gptq(W[r:r + HEAD_ROWS], H, s, o.damp, o.block_size, o.act_order, o.clip)
            _spill.let_go(_spill.file_ranges([W[r:r + HEAD_ROWS]]))  # a heap table is never let go
            codes[r:r + len(c)], scales[r:r + len(c)] = c, sc
            if zeros is not None:
                zeros[r:r + len(c)] = z
        del W
        old.release()  # the float table, if it can be read again
        lin.weight = QuantWeight(codes=codes, scales=scales, zeros=zeros, bits=s.bits,
                                 group_size=g, symmetric=s.symmetric, algorithm="gptq")
        return spilled(lin.weight, codes_file)

    def _site(self, site: Site, s: QuantScheme, memo: dict[int, tuple]) -> None:
        todo = {}  # one weight object under several linears is quantized once
        for lin in site.linears:
            if not isinstance(lin.weight, QuantWeight) and id(lin.weight) not in memo:
                todo.setdefault(id(lin.weight), lin.weight)
        if todo:
            o = self.options
            # W and H inline, no name holding them: gptq's work arrays, freed as it replaces them
            codes, scales, zeros = gptq(torch.cat([w.float() for w in todo.values()]), gram(site.x).mul_(2), s,
                                        o.damp, o.block_size, o.act_order, o.clip, overwrite=True)
            r = 0
            for key, w in todo.items():
                k = w.shape[0]
                memo[key] = (w, QuantWeight(  # keeps w alive, so its id is never reused
                    codes=codes[r:r + k].clone(), scales=scales[r:r + k].clone(),
                    zeros=zeros[r:r + k].clone() if zeros is not None else None,
                    group_size=s.at(w.shape[1]).group_size, bits=s.bits, symmetric=s.symmetric,
                    algorithm="gptq"))
                r += k
                w.release()  # the float copy can be re-read from the checkpoint if ever needed
        for lin in site.linears:
            if id(lin.weight) in memo:
                lin.weight = memo[id(lin.weight)][1]
