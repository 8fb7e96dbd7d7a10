"""Teacher-forced comparison over windows of text: every logit row of every window compared.

The text is sampled by the reference itself (temperature 1, a fixed torch generator), or is
the user's file. Each window starts at position 0 with an empty cache and runs through the
artifact's session (`step_all`: every row) and through the reference (full sequence, no
cache), so every row of the prefill is compared and a window as long as the cache reaches
past every sliding window and ring-buffer wrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..compiler import reference
from ..compiler.ir import Model

# Sampling without a KV cache costs a forward per token: the sampler sees at most this many
# previous tokens (the text only has to be the model's own kind of text; scoring then runs with
# the full window as context).
SAMPLE_CONTEXT = 64


def sample_windows(model: Model, seed_ids: list[int], n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n windows of `length` tokens, continued with tokens the reference samples from its own
    distribution (temperature 1, one fixed generator). Only the first window starts with the
    prompt (up to a quarter of seed_ids); each other window starts from its own first token,
    drawn without replacement from the reference's distribution after the prompt's first
    token, and never the first window's. So no two windows share a row (a row's logits depend
    only on the tokens up to it), and the positions the bounds count are distinct."""
    g = torch.Generator().manual_seed(seed)
    start = list(seed_ids[: max(1, min(len(seed_ids), length // 4))]) or [0]
    windows = _continue(model, [start], length, g)
    if n > 1:
        p = torch.softmax(reference.forward(model, torch.tensor([start[:1]]))[0, -1].double(), -1)
        p[start[0]] = 0.0
        distinct = n - 1 <= int((p > 0).sum())  # else (a vocabulary smaller than n) some share a start
        firsts = torch.multinomial(p, n - 1, replacement=not distinct, generator=g)[:, None].tolist()
        windows += _continue(model, firsts, length, g)
    return windows


def _continue(model: Model, starts: list[list[int]], length: int, g: torch.Generator) -> list[list[int]]:
    """Equal-length starts, each continued to `length` tokens by the reference's sampling."""
    ids = torch.tensor(starts)
    while ids.shape[1] < length:
        logits = reference.forward(model, ids[:, -SAMPLE_CONTEXT:])[:, -1].double()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        ids = torch.cat([ids, nxt], 1)
    return ids.tolist()


def text_windows(ids: list[int], n: int, length: int) -> list[list[int]]:
    """Up to n consecutive windows of `length` tokens of the user's text (a shorter last one
    if that is all there is)."""
    out = [ids[i:i + length] for i in range(0, len(ids), length)][:n]
    return [w for w in out if len(w) >= 2]


@dataclass
class Agreement:
    """Running statistics of artifact logits against reference logits over compared rows."""

    exact_max_abs: float | None = None  # the exact rule's bound: near ties count as agreeing
    rows: int = 0
    agree: int = 0
    ties: int = 0
    max_abs: float = 0.0
    kl: float = 0.0  # summed KL(reference || subject), nats
    nll_ref: float = 0.0
    nll_sub: float = 0.0
    scored: int = 0  # rows with a next token (NLL)
    row_max_abs: list[float] = field(default_factory=list)

    def add(self, ref: torch.Tensor, sub: torch.Tensor, ids: list[int]) -> None:
        """ref, sub: [T, vocab] logits at positions 0..T-1 of the window `ids`."""
        ref, sub = ref.double(), sub.double()
        diff = (sub - ref).abs().amax(-1)
        self.row_max_abs += diff.tolist()
        self.max_abs = max(self.max_abs, float(diff.max()))
        a, b = sub.argmax(-1), ref.argmax(-1)
        same = a == b
        self.agree += int(same.sum())
        if self.exact_max_abs is not None:  # a near tie: the reference ranks the two within twice the row's error
            gap = ref.gather(1, b[:, None])[:, 0] - ref.gather(1, a[:, None])[:, 0]
            tie = ~same & (diff <= self.exact_max_abs) & (gap <= 2 * diff)
            self.ties += int(tie.sum())
        rlp, slp = F.log_softmax(ref, -1), F.log_softmax(sub, -1)
        self.kl += float((rlp.exp() * (rlp - slp)).sum())
        nxt = torch.tensor(ids[1:])[:, None]
        self.nll_ref -= float(rlp[:-1].gather(1, nxt).sum())
        self.nll_sub -= float(slp[:-1].gather(1, nxt).sum())
        self.rows += ref.shape[0]
        self.scored += len(ids) - 1

    @property
    def top1(self) -> float:
        return (self.agree + self.ties) / max(self.rows, 1)

    @property
    def mean_kl(self) -> float:
        return self.kl / max(self.rows, 1)

    @property
    def ref_ppl(self) -> float:
        return math.exp(self.nll_ref / max(self.scored, 1))

    @property
    def sub_ppl(self) -> float:
        return math.exp(self.nll_sub / max(self.scored, 1))

    @property
    def delta_ppl(self) -> float:
        """subject perplexity / reference perplexity − 1, on the same positions."""
        return math.exp((self.nll_sub - self.nll_ref) / max(self.scored, 1)) - 1

    def summary(self) -> dict:
        return {"positions": self.rows, "max_abs": self.max_abs, "top1": self.top1, "near_ties": self.ties,
                "mean_kl": self.mean_kl, "delta_ppl": self.delta_ppl, "reference_ppl": self.ref_ppl,
                "subject_ppl": self.sub_ppl}


def compare_windows(model: Model, session, windows: list[list[int]], exact_max_abs: float | None,
                    nudge: float | None) -> tuple[Agreement, Agreement | None]:
    """The artifact's session against the reference on every row of every window."""
    def rows():
        for ids in windows:
            session.reset()
            yield session.step_all(ids, 0).float()

    return compare_logits(model, windows, rows(), exact_max_abs, nudge)


def compare_logits(model: Model, windows: list[list[int]], logits, exact_max_abs: float | None,
                   nudge: float | None) -> tuple[Agreement, Agreement | None]:
    """The artifact's logits (one [len(window), vocab] array per window, in order, each window
    run from position 0 with an empty cache; on this host or sent back by a device) against
    the reference on every row; with `nudge`, also the reference against itself with its
    embeddings nudged (its own sensitivity, a diagnostic)."""
    art = Agreement(exact_max_abs)
    noise = Agreement() if nudge else None
    for ids, sub in zip(windows, logits, strict=True):
        ref = reference.forward(model, torch.tensor([ids]))[0]
        art.add(ref, torch.as_tensor(sub).float(), ids)
        if noise is not None:
            noise.add(ref, reference.forward(model, torch.tensor([ids]), nudge)[0], ids)
    return art, noise
