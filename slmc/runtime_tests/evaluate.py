"""Perplexity, KL divergence and top-1 agreement of a model or an artifact on text.

Windows of `window` tokens start every `stride` tokens; each window scores the
tokens the previous one did not (the first scores all but its first), so every
token after the first is predicted once, with up to window - stride tokens of
context. The same windows run through the fp32 reference for KL and top-1.
Artifacts run in their own runtime, one decode step per token (their methods
return the last position's logits).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..compiler import reference
from ..compiler.ir import Model


@dataclass
class EvalReport:
    subject: str
    tokens_scored: int
    window: int
    stride: int
    perplexity: float
    reference_perplexity: float | None
    kl_divergence: float | None  # mean KL(reference || subject) per scored token, nats
    top1_agreement: float | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) triples covering tokens 1..n-1 once."""
    out, scored_to, start = [], 1, 0
    while scored_to < n:
        end = min(start + window, n)
        out.append((start, end, max(scored_to, start + 1)))
        scored_to = end
        if end == n:
            break
        start += stride
    return out


def _ir_logits(model: Model, ids: list[int]) -> torch.Tensor:
    return reference.forward(model, torch.tensor([ids]))[0]


def _session_logits(session, ids: list[int]) -> torch.Tensor:
    session.reset()
    return torch.stack([session.step([t], i) for i, t in enumerate(ids)])


def evaluate(ids: list[int], subject, subject_name: str, ref_model: Model | None, window: int = 512,
             stride: int = 256) -> EvalReport:
    """subject: a Model (IR, run by the reference executor) or a runtime Session."""
    t0 = time.time()
    run = (lambda x: _ir_logits(subject, x)) if isinstance(subject, Model) else (lambda x: _session_logits(subject, x))
    nll = ref_nll = kl = 0.0
    agree = count = 0
    for start, end, first in windows(len(ids), window, stride):
        chunk = ids[start:end]
        logits = run(chunk).float()
        sl = slice(first - start - 1, end - start - 1)  # logits at i predict token i + 1
        target = torch.tensor(chunk[first - start:])
        lp = F.log_softmax(logits[sl], -1)
        nll += float(-lp.gather(1, target[:, None]).sum())
        if ref_model is not None:
            rlp = F.log_softmax(_ir_logits(ref_model, chunk).float()[sl], -1)
            ref_nll += float(-rlp.gather(1, target[:, None]).sum())
            kl += float((rlp.exp() * (rlp - lp)).sum())
            agree += int((rlp.argmax(-1) == lp.argmax(-1)).sum())
        count += len(target)
    has_ref = ref_model is not None
    return EvalReport(
        subject=subject_name, tokens_scored=count, window=window, stride=stride,
        perplexity=math.exp(nll / count), reference_perplexity=math.exp(ref_nll / count) if has_ref else None,
        kl_divergence=kl / count if has_ref else None, top1_agreement=agree / count if has_ref else None,
        seconds=round(time.time() - t0, 2))
