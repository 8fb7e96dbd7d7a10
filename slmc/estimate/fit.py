"""Fitting a runtime's parameters to published figures, and the leave-one-out check.

A form predicts the time of one token as a sum of terms, each the time it would take at
parameter 1 (`Point.terms`) times a parameter >= 0:

    decode A: bytes / bandwidth x (1 / eff_bw)  +  layers / clock x overhead_cycles
    decode B: bytes / bandwidth x (1 / eff_bw)
    prefill:  operations / peak x (1 / eff_compute)

The fit minimises the squared relative error of the time, sum_i (predicted_i / published_i
- 1)^2, which is linear least squares in the parameters (rows terms_i / published_i, target 1);
a parameter that comes out negative is pinned to 0 and the others refitted (every subset is
tried: a form has at most two terms). A fit needs at least as many figures as parameters.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# form -> (metric, names of its terms, in the order Point.terms carries them for that metric)
FORMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "A": ("decode", ("memory_s", "layer_cycles_s")),
    "B": ("decode", ("memory_s",)),
    "prefill": ("prefill", ("compute_s",)),
}


@dataclass(frozen=True)
class Point:
    """One published figure, as the fit sees it."""

    key: str
    runtime: str
    metric: str
    terms: dict  # term name -> seconds per token at parameter 1
    seconds: float  # published seconds per token (1 / tok/s)


class NotEstimable(Exception):
    """Too few figures for the form's parameters."""


def _loss(theta: np.ndarray, x: np.ndarray) -> float:
    return float(((x @ theta) - 1.0) @ ((x @ theta) - 1.0))


def fit(points: list[Point], form: str) -> tuple[float, ...]:
    """The form's parameters (>= 0) from `points` (one runtime, the form's metric)."""
    names = FORMS[form][1]
    if len(points) < len(names):
        raise NotEstimable(f"{len(points)} figure(s) for {len(names)} parameter(s)")
    x = np.array([[p.terms[n] / p.seconds for n in names] for p in points], dtype=float)
    best, best_loss = None, float("inf")
    for k in range(len(names), 0, -1):
        for cols in itertools.combinations(range(len(names)), k):
            sol = np.linalg.lstsq(x[:, cols], np.ones(len(points)), rcond=None)[0]
            if (sol < 0).any():
                continue
            theta = np.zeros(len(names))
            theta[list(cols)] = sol
            loss = _loss(theta, x)
            if loss < best_loss - 1e-15:
                best, best_loss = theta, loss
    if best is None:  # every subset needs a negative parameter: the data contradict the form
        raise NotEstimable("no fit with non-negative parameters")
    return tuple(float(v) for v in best)


def predict(theta: tuple[float, ...], point: Point, form: str) -> float:
    """Predicted seconds per token."""
    return float(sum(t * point.terms[n] for t, n in zip(theta, FORMS[form][1], strict=True)))


def leave_one_out(points: list[Point], form: str, fitter=fit, only: tuple[str, ...] | None = None) -> list[dict]:
    """Each point of the form's metric (or those whose key is in `only`) predicted from a fit on
    the same runtime's OTHER points of that metric. `fitter` is `fit` (a parameter so a test can
    watch what it is given)."""
    metric = FORMS[form][0]
    mine = [p for p in points if p.metric == metric]
    out = []
    for held in (p for p in mine if only is None or p.key in only):
        others = [p for p in mine if p.runtime == held.runtime and p.key != held.key]
        row = {"key": held.key, "runtime": held.runtime, "published_tok_s": 1 / held.seconds,
               "fitted_on": [p.key for p in others]}
        try:
            theta = fitter(others, form)
        except NotEstimable as e:
            out.append({**row, "estimate_tok_s": None, "params": None,
                        "not_estimable": f"not estimable: {e} ({len(others)} other figure(s) of this runtime)"})
            continue
        est = 1 / predict(theta, held, form)
        out.append({**row, "estimate_tok_s": est, "params": list(theta), "ratio": est * held.seconds,
                    "not_estimable": None})
    return out
