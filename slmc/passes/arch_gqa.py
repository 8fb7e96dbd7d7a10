"""arch.gqa: attention heads to fewer KV groups (MHA, or GQA with more KV heads, to G groups).

Every depth's attention ends with `kv_groups` = G KV heads, each shared by n_heads / G query
heads, so the KV cache shrinks by n_kv_heads / G. Query heads are handled one by one: head h
reads old KV head h // (n_heads / n_kv_heads), so G need not divide the old KV head count.

1. Grouping. `method=mean`: contiguous query heads (Ainslie et al. 2023). `method=similarity`:
   on calibration data, the cosine similarity of two old KV heads is the mean of the cosines
   of their K outputs (pre-norm, pre-RoPE) and of their V outputs over every token; query heads
   inherit their KV head's rows (heads sharing a KV head have similarity exactly 1). Equal-size
   groups are grown greedily (lowest free head as seed, then the free head with the highest
   summed similarity to the members) and improved by pairwise swaps while the within-group
   similarity rises. Q's rows and O's columns are permuted by head so each group is contiguous.
2. Mean pooling: a group's K and V projections (and biases) are the mean of its query heads'
   old ones; a group fed by one old KV head copies it (exact).
3. Refit (`refit=true`, closed form, no training). Per layer, targets come from the original
   model's input to the layer, features from the converted-so-far model's input X (so the
   refit also absorbs the drift of earlier converted layers); every fit is a ridge toward the
   mean-pooled (for O: the permuted original) weights:
   - K: W_g = argmin sum_{h in g} ||Q_h (W_g - W_h) X^T||^2 = (sum C_h)^-1 sum C_h W_h with
     C_h = Q_h^T Q_h, the pre-RoPE (post q_norm) query covariance of head h: the attention
     scores of every (query, key) pair before RoPE. RoPE rotates q and k per position, the
     same way for every head, so this ignores only the relative rotation. Damping DAMP.
     With k_norm (Qwen3, Gemma 3) the key is renormalized after the projection, so K keeps
     the mean pool.
   - V: with the new keys' attention probabilities A'_h, W_g = argmin sum_{h in g}
     ||A'_h X W_g^T - A_h X_0 W_h^T||^2 (A_h, X_0: the original model's): each grouped head's
     value output reproduces the original one, so V also absorbs the change in attention.
   - O: argmin ||C' O'^T - C O^T||^2 over the concatenated new head outputs C': the attention
     output itself (before any post-attention norm), which is the error reported.
   V and O pick their ridge strength from DAMPS by 2-fold held-out error over alternate
   calibration sequences (O has hidden x n_heads*head_dim weights and overfits a few
   thousand tokens otherwise). A layer keeps the mean-pooled weights if the refit does not
   lower its calibration error (relative squared error of the attention output).

Calibration (compiler/calib.py: calib=FILE;FILE text or data-free samples) runs only for
similarity grouping, the refit, or when calib= is given (to report the error); a layer's
mean-pooled and refit errors are measured on the same inputs. A layer already at G KV heads
is left as it is; a block used at several depths converts once. Fused qkv is split for the
conversion and fused again; quantized q/k/v/o are refused (requires float_attention:
run arch.gqa before quant.*).

Before (SmolLM2-135M):                   After (kv_groups=1):
  attn: heads=9 kv_heads=3 head_dim=64     attn: heads=9 kv_heads=1 head_dim=64
    q: f32[576,576]                          q: f32[576,576]     (rows permuted by head)
    k: f32[192,576]                          k: f32[64,576]      (pooled / refit)
    v: f32[192,576]                          v: f32[64,576]      (pooled / refit)
    o: f32[576,576]                          o: f32[576,576]     (permuted / refit)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from ..compiler import reference
from ..compiler.calib import calibration_ids, split_files
from ..compiler.ir import Attention, Linear, Model, Weight
from ..compiler.pass_manager import Pass, PassResult, register
from ..errors import SlmcError
from ._options import CalibOptions
from ._walk import concat_linears, split_linear

METHODS = ("mean", "similarity")
DAMP = 1e-2  # ridge toward the mean-pooled weights, relative to the mean Gram diagonal (K)
DAMPS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the V and O refits pick theirs by held-out error
KV_ELEMENT_BYTES = {"float32": 4, "float16": 2, "int8": 1}
WHERE = "--pass arch.gqa"


@dataclass(frozen=True)
class GQAOptions(CalibOptions):
    kv_groups: int = 0  # G: KV heads per layer after the pass (required)
    method: str = "similarity"  # "mean": contiguous heads; "similarity": by K/V activations
    refit: bool = True  # least-squares refit of K, V and O on calibration data

    def __post_init__(self):
        if self.kv_groups < 1:
            raise ValueError(f"kv_groups must be >= 1 (got {self.kv_groups}); e.g. arch.gqa:kv_groups=1")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")


def kv_bytes_per_token(ir: Model) -> int:
    """K and V bytes one token adds to the cache, over every depth."""
    el = KV_ELEMENT_BYTES[ir.kv.dtype]
    return sum(2 * ir.block_at(d).attn.n_kv_heads * ir.block_at(d).attn.head_dim * el for d in range(ir.n_layers))


def check(ir: Model, G: int) -> None:
    for i, b in enumerate(ir.blocks):
        a, where = b.attn, f"{WHERE} (blocks.{i}.attn)"
        if a.n_heads % G:
            raise SlmcError(f"kv_groups={G} does not divide the {a.n_heads} query heads", where)
        if G > a.n_kv_heads:
            raise SlmcError(f"kv_groups={G} is more than the {a.n_kv_heads} KV heads there are "
                            "(the pass merges heads, it cannot add them)", where)


def balanced_groups(sim: torch.Tensor, G: int) -> list[list[int]]:
    """Partition range(H) into G groups of H / G maximizing the summed within-group similarity
    (greedy growth, then improving pairwise swaps); groups sorted, ordered by first head."""
    S = sim.double()
    H = S.shape[0]
    r = H // G
    free, groups = list(range(H)), []
    while free:
        members, cand = [free[0]], free[1:]
        while len(members) < r:
            best = cand[int(S[cand][:, members].sum(1).argmax())]  # ties: the lowest index
            members.append(best)
            cand.remove(best)
        groups.append(members)
        free = [h for h in free if h not in members]
    for _ in range(100):  # swaps; each strictly raises the objective, so this terminates
        swapped = False
        for ga in range(G):
            for gb in range(ga + 1, G):
                for i in list(groups[ga]):
                    for j in list(groups[gb]):
                        ra = [m for m in groups[ga] if m != i]
                        rb = [m for m in groups[gb] if m != j]
                        gain = float(S[j, ra].sum() - S[i, ra].sum() + S[i, rb].sum() - S[j, rb].sum())
                        if gain > 1e-9:
                            groups[ga], groups[gb] = ra + [j], rb + [i]
                            swapped = True
                            break
                    if swapped:
                        break
        if not swapped:
            break
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def _heads(a: Attention, x: torch.Tensor, pos: torch.Tensor, q: torch.Tensor | None = None) -> dict:
    """The reference executor's attention (split q/k/v), opened up: pre-RoPE q (after q_norm),
    k before k_norm, v per KV head, softmax probabilities [n, H, T, T] and the per-head outputs
    [n, H, T, d]. `q`: the projected queries [n, H, T, d] when the caller has them already."""
    n, T, _ = x.shape
    if q is None:
        q = reference.linear(x, a.q).view(n, T, a.n_heads, a.head_dim).transpose(1, 2)
    k, v = reference.linear(x, a.k), reference.linear(x, a.v)
    k = k.view(n, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    v = v.view(n, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    if a.q_norm is not None:
        q = reference.rms_norm(q, a.q_norm)
    kn = reference.rms_norm(k, a.k_norm) if a.k_norm is not None else k
    cos, sin = reference.rope_cos_sin(a.rope, pos)
    rep = a.n_heads // a.n_kv_heads
    qr = reference.apply_rope(q, cos, sin)
    kr = reference.apply_rope(kn, cos, sin).repeat_interleave(rep, dim=1)
    scores = (qr @ kr.transpose(-1, -2)) * a.scale
    if a.logit_softcap is not None:
        scores = torch.tanh(scores / a.logit_softcap) * a.logit_softcap
    scores = scores.masked_fill(~reference.causal_mask(pos, a.sliding_window), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return {"q": q, "k": k, "v": v, "probs": probs, "core": probs @ v.repeat_interleave(rep, dim=1)}


def _flat_core(core: torch.Tensor) -> torch.Tensor:
    n, H, T, d = core.shape
    return core.transpose(1, 2).reshape(n * T, H * d)


def _lin(w: torch.Tensor, b: torch.Tensor | None) -> Linear:
    return Linear(Weight(w.contiguous()), Weight(b.contiguous()) if b is not None else None)


def _ridge(G: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor, lam: float | None = None) -> torch.Tensor:
    """argmin_W ||fit||^2 + lam ||W - prior||^2 in normal form: (G + lam I)^-1 (rhs + lam prior)."""
    lam = DAMP * float(G.diagonal().mean()) + 1e-12 if lam is None else lam
    return torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), rhs + lam * prior)


def _ridge_cv(gs: torch.Tensor, rs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """_ridge with lam picked from DAMPS by 2-fold held-out error: gs[f], rs[f] are the Gram
    matrix and right-hand side of fold f (alternate calibration sequences). The held-out error
    of W on fold f is tr(W^T gs[f] W) - 2 tr(W^T rs[f]) up to a constant."""
    scale = float((gs[0] + gs[1]).diagonal().mean()) / 2 + 1e-12  # one fold's mean diagonal
    if float(gs[1].diagonal().sum()) == 0:  # one calibration sequence: no held-out fold
        return _ridge(gs[0], rs[0], prior)
    errs = []
    for damp in DAMPS:
        e = 0.0
        for f in (0, 1):
            W = _ridge(gs[f], rs[f], prior, damp * scale)
            e += float(((gs[1 - f] @ W) * W).sum() - 2 * (rs[1 - f] * W).sum())
        errs.append(e)
    lam = DAMPS[min(range(len(DAMPS)), key=errs.__getitem__)] * scale
    return _ridge(gs[0] + gs[1], rs[0] + rs[1], prior, lam)


class Layer:
    """One attention layer's conversion. `ref` is the layer's input in the original model (it
    gives the targets: the original per-head outputs), `x` its input in the converted model
    so far (it gives the features the refit fits, so the refit also absorbs upstream drift)."""

    def __init__(self, a: Attention, G: int, ref: torch.Tensor | None, x: torch.Tensor | None, chunk: int):
        self.a, self.G, self.ref, self.x, self.chunk = a, G, ref, x, chunk
        self.H, self.K, self.d = a.n_heads, a.n_kv_heads, a.head_dim
        self.src = [h // (self.H // self.K) for h in range(self.H)]  # old KV head of each query head
        self.pos = torch.arange(x.shape[1]) if x is not None else None
        self._qx = None

    def chunks(self, x: torch.Tensor):
        for i in range(0, len(x), self.chunk):
            yield x[i:i + self.chunk]

    def run(self, a: Attention):
        """(input chunk, _heads) of candidate `a` on the converted-model input. Candidates only
        permute Q's rows, so the queries are projected once and permuted per candidate."""
        if self._qx is None:
            self._qx = [reference.linear(xc, self.a.q).view(len(xc), -1, self.H, self.d).transpose(1, 2)
                        for xc in self.chunks(self.x)]
        idx = torch.tensor(self.perm)
        for xc, q in zip(self.chunks(self.x), self._qx):
            yield xc, _heads(a, xc, self.pos, q[:, idx])

    def stats(self) -> None:
        """Similarity of the old KV heads, query covariances, the original outputs."""
        H, K, d = self.H, self.K, self.d
        gk, gv = torch.zeros(K, K, dtype=torch.float64), torch.zeros(K, K, dtype=torch.float64)
        self.cq = torch.zeros(H, d, d, dtype=torch.float64)
        cores = []
        for xc in self.chunks(self.ref):
            h = _heads(self.a, xc, self.pos)
            gk += torch.einsum("nitd,njtd->ij", h["k"], h["k"]).double()
            gv += torch.einsum("nitd,njtd->ij", h["v"], h["v"]).double()
            self.cq += torch.einsum("nhti,nhtj->hij", h["q"], h["q"]).double()
            cores.append(h["core"])
        self.core = torch.cat(cores)  # [N, H, T, d], original head order
        cos = [g / (g.diagonal()[:, None] * g.diagonal()[None, :]).sqrt().clamp_min(1e-30) for g in (gk, gv)]
        sim = ((cos[0] + cos[1]) / 2).clamp(max=1.0)
        sim.fill_diagonal_(1.0)
        idx = torch.tensor(self.src)
        self.sim = sim[idx][:, idx]
        self.target = _flat_core(self.core) @ self.a.o.weight.float().T  # attention output, bias aside

    def error(self, a: Attention) -> float:
        cores = torch.cat([h["core"] for _, h in self.run(a)])
        y = _flat_core(cores) @ a.o.weight.float().T
        return float((y - self.target).pow(2).sum() / self.target.pow(2).sum().clamp_min(1e-30))

    def pooled(self, groups: list[list[int]]) -> Attention:
        """Q/O permuted so groups are contiguous; K/V (and biases) mean-pooled per group."""
        a, H, d = self.a, self.H, self.d
        self.perm = [h for g in groups for h in g]
        idx = torch.tensor(self.perm)
        q = a.q.weight.float().view(H, d, -1)[idx].reshape(H * d, -1)
        qb = a.q.bias.float().view(H, d)[idx].reshape(-1) if a.q.bias is not None else None
        o = a.o.weight.float().view(a.o.out_features, H, d)[:, idx].reshape(a.o.out_features, H * d)
        kv = []
        for lin in (a.k, a.v):
            w = lin.weight.float().view(self.K, d, -1)
            b = lin.bias.float().view(self.K, d) if lin.bias is not None else None
            ws, bs = [], []
            for g in groups:
                srcs = [self.src[h] for h in g]
                if len(set(srcs)) == 1:  # one old KV head: copy it, no rounding
                    ws.append(w[srcs[0]].clone())
                    bs.append(b[srcs[0]].clone() if b is not None else None)
                else:
                    ws.append(w[srcs].mean(0))
                    bs.append(b[srcs].mean(0) if b is not None else None)
            kv.append(_lin(torch.cat(ws), torch.cat(bs) if b is not None else None))
        return dataclasses.replace(a, n_kv_heads=self.G, q=_lin(q, qb), k=kv[0], v=kv[1],
                                   o=Linear(Weight(o.contiguous()), a.o.bias))

    def refit(self, groups: list[list[int]], base: Attention) -> Attention:
        k = base.k if base.k_norm is not None else self._refit_k(groups, base)
        a = dataclasses.replace(base, k=k)
        a = dataclasses.replace(a, v=self._refit_v(a))
        return dataclasses.replace(a, o=self._refit_o(a))

    def _refit_k(self, groups, base: Attention) -> Linear:
        a, d = self.a, self.d
        wk = a.k.weight.float().view(self.K, d, -1)
        bk = a.k.bias.float().view(self.K, d) if a.k.bias is not None else None
        w = torch.cat([wk, bk[..., None]], -1) if bk is not None else wk  # bias as one more input
        prior = base.k.weight.float().view(self.G, d, -1)
        if bk is not None:
            prior = torch.cat([prior, base.k.bias.float().view(self.G, d)[..., None]], -1)
        out = []
        for g, members in enumerate(groups):
            C = sum(self.cq[h] for h in members)
            rhs = sum(self.cq[h] @ w[self.src[h]].double() for h in members)
            out.append(_ridge(C, rhs, prior[g].double()).float())
        W = torch.cat(out)
        return _lin(W[:, :-1], W[:, -1]) if bk is not None else _lin(W, None)

    def _refit_v(self, a: Attention) -> Linear:
        """Grouped values through the new attention reproduce each head's original output.
        sum_h Z_h^T Z_h with Z_h = A_h X is X^T (sum_h A_h^T A_h) X per sequence: T x T work
        per head instead of T x hidden."""
        G, d, r = self.G, self.d, self.H // self.G
        bias = a.v.bias is not None
        n_in = self.x.shape[-1] + bias
        gz = torch.zeros(G, 2, n_in, n_in, dtype=torch.float64)  # [group, fold, ...]
        gzy = torch.zeros(G, 2, n_in, d, dtype=torch.float64)
        idx, i0 = torch.tensor(self.perm), 0
        for xc, h in self.run(a):
            probs = h["probs"]  # new head order
            y = self.core[i0:i0 + len(xc)][:, idx]  # original outputs, new head order
            fold = (torch.arange(i0, i0 + len(xc)) % 2)[:, None, None]
            i0 += len(xc)
            if bias:  # rows of the probabilities sum to 1, so a ones column carries the bias
                xc = torch.cat([xc, torch.ones(*xc.shape[:-1], 1)], -1)
            for g in range(G):
                pg, yg = probs[:, g * r:(g + 1) * r], y[:, g * r:(g + 1) * r]
                m = (pg.transpose(-1, -2) @ pg).sum(1)  # [n, T, T]
                zz = (xc.transpose(1, 2) @ (m @ xc)).double()  # per sequence
                zy = (xc.transpose(1, 2) @ (pg.transpose(-1, -2) @ yg).sum(1)).double()
                for f in (0, 1):
                    gz[g, f] += (zz * (fold == f)).sum(0)
                    gzy[g, f] += (zy * (fold == f)).sum(0)
        prior = a.v.weight.float().view(G, d, -1)
        if bias:
            prior = torch.cat([prior, a.v.bias.float().view(G, d)[..., None]], -1)
        W = torch.cat([_ridge_cv(gz[g], gzy[g], prior[g].T.double()).T.float() for g in range(G)])
        return _lin(W[:, :-1], W[:, -1]) if bias else _lin(W, None)

    def _refit_o(self, a: Attention) -> Linear:
        """The new head outputs, mixed by O, reproduce the original attention output."""
        cores = torch.cat([h["core"] for _, h in self.run(a)])
        N, T = cores.shape[0], cores.shape[2]
        target = self.target.view(N, T, -1)
        gc = torch.zeros(2, cores.shape[1] * self.d, cores.shape[1] * self.d, dtype=torch.float64)
        gcy = torch.zeros(2, gc.shape[1], target.shape[-1], dtype=torch.float64)
        for i in range(0, N, self.chunk):  # fold: the sequence's parity
            c = cores[i:i + self.chunk]
            for f in (0, 1):
                s0 = (f - i) % 2  # first sequence of fold f in this chunk
                cf = _flat_core(c[s0::2])
                yf = target[i:i + self.chunk][s0::2].reshape(len(cf), -1)
                gc[f] += (cf.T @ cf).double()
                gcy[f] += (cf.T @ yf).double()
        W = _ridge_cv(gc, gcy, a.o.weight.float().double().T).T.float()
        return Linear(Weight(W.contiguous()), a.o.bias)


def _split(a: Attention) -> Attention:
    if not a.fused:
        return a
    nq, nkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    q, k, v = split_linear(a.qkv, [nq, nkv, nkv])
    return dataclasses.replace(a, q=q, k=k, v=v, qkv=None)


@register
class ArchGQA(Pass):
    name = "arch.gqa"
    Options = GQAOptions
    requires = ("float_attention",)  # mean pooling and the refit need float K/V/O

    def run(self, ir: Model) -> PassResult:
        o, G = self.options, self.options.kv_groups
        check(ir, G)  # every bad input is refused before calibration starts
        todo = sorted({bi for bi in ir.layers if ir.blocks[bi].attn.n_kv_heads != G})
        before = kv_bytes_per_token(ir)
        if not todo:
            return PassResult(ir, False, {"kv_groups": G, "layers_converted": 0,
                                          "kv_cache_bytes_per_token": {"before": before, "after": before}})
        files = split_files(o.calib)
        calibrate = o.method == "similarity" or o.refit or bool(files)
        t0 = time.perf_counter()
        ids = calibration_ids(ir, files, o.n_seqs, o.seq_len, o.seed) if calibrate else None
        stats = {"t_calib": time.perf_counter() - t0, "err_mean": [], "err": [], "refit": 0, "groups": {}}
        new: dict[int, Attention] = {}
        ref = x = reference.embed(ir, ids) if calibrate else None
        pos = torch.arange(ids.shape[1]) if calibrate else None
        chunk = max(1, 2048 // ids.shape[1]) if calibrate else 1

        def forward(blk, t):
            return torch.cat([reference.block(blk, t[i:i + chunk], pos) for i in range(0, len(t), chunk)])

        for d in range(ir.n_layers):
            bi, b = ir.layers[d], ir.block_at(d)
            if bi in todo and bi not in new:
                n_ref, n_x = (reference.rms_norm(t, b.attn_norm) if calibrate else None for t in (ref, x))
                new[bi] = self._convert(_split(b.attn), n_ref, n_x, chunk, bi, stats)
            if calibrate and d + 1 < ir.n_layers:  # both streams: the original and the converted model
                ref, x = forward(b, ref), forward(dataclasses.replace(b, attn=new.get(bi, b.attn)), x)
        for bi, a in new.items():
            if ir.blocks[bi].attn.fused:
                a = dataclasses.replace(a, qkv=concat_linears([a.q, a.k, a.v]), q=None, k=None, v=None)
            ir.blocks[bi].attn = a
        after = kv_bytes_per_token(ir)
        info = {"kv_groups": G, "method": o.method, "refit": o.refit, "layers_converted": len(new),
                "kv_cache_bytes_per_token": {"before": before, "after": after},
                "kv_cache_reduction": round(before / after, 3)}
        if calibrate:
            info.update(calibration=o.describe(),
                        calibration_seconds=round(stats["t_calib"], 2),
                        calib_error_mean_pool=_avg(stats["err_mean"]), calib_error=_avg(stats["err"]))
            if o.refit:
                info["layers_refit"] = stats["refit"]
            if o.method == "similarity":
                info["groups"] = stats["groups"]
        return PassResult(ir, True, info)

    def _convert(self, a: Attention, ref: torch.Tensor | None, x: torch.Tensor | None, chunk: int, bi: int,
                 stats: dict) -> Attention:
        o, G = self.options, self.options.kv_groups
        layer = Layer(a, G, ref, x, chunk)
        if x is None:  # mean pooling, no calibration
            return layer.pooled(contiguous(a.n_heads, G))
        layer.stats()
        groups = balanced_groups(layer.sim, G) if o.method == "similarity" else contiguous(a.n_heads, G)
        stats["groups"][str(bi)] = groups
        best = layer.pooled(groups)
        err = err_mean = layer.error(best)
        merged = any(len({layer.src[h] for h in g}) > 1 for g in groups)
        if o.refit and merged:  # nothing to fit when every group copies one old KV head
            cand = layer.refit(groups, best)
            err_cand = layer.error(cand)
            if err_cand < err_mean:
                best, err = cand, err_cand
                stats["refit"] += 1
        stats["err_mean"].append(err_mean)
        stats["err"].append(err)
        return best


def _avg(v: list[float]) -> float:
    return round(sum(v) / len(v), 6)


def contiguous(H: int, G: int) -> list[list[int]]:
    r = H // G
    return [list(range(g * r, (g + 1) * r)) for g in range(G)]
