"""The runtime parameters of slmc estimate: fitted to published phone figures, and judged
leave-one-out. The machinery must never use the held-out figure; runtimes.py must carry the
fit on all figures (from the public configs in bench/configs, no weights)."""

import math
from pathlib import Path

import numpy as np
import pytest

from slmc import api
from slmc.estimate import (
    DEVICES,
    FLOWS,
    PUBLISHED,
    RUNTIMES,
    NotEstimable,
    Point,
    fit,
    leave_one_out,
    predict,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "bench" / "configs"


def _points(theta=(2.0, 300.0), runtime="r:a") -> list[Point]:
    """Exact data of form A with known parameters (1/eff_bw = 2, 300 cycles per layer)."""
    pts = []
    for i, (mem, cyc) in enumerate([(1e-3, 1e-6), (2e-3, 3e-6), (5e-3, 2e-6), (1e-2, 4e-6)]):
        terms = {"memory_s": mem, "layer_cycles_s": cyc}
        pts.append(Point(f"p{i}", runtime, "decode", terms, theta[0] * mem + theta[1] * cyc))
    return pts


def test_fit_recovers_known_parameters():
    theta = fit(_points(), "A")
    assert theta == pytest.approx((2.0, 300.0), rel=1e-9)
    assert fit(_points(), "B")[0] > 2.0  # control: without the overhead term the bandwidth term absorbs it


def test_fit_keeps_parameters_non_negative():
    """Figures faster for more layers would need a negative overhead: it is pinned at 0."""
    pts = [Point("a", "r", "decode", {"memory_s": 1e-3, "layer_cycles_s": 1e-6}, 1e-3),
           Point("b", "r", "decode", {"memory_s": 1e-3, "layer_cycles_s": 4e-6}, 0.5e-3)]
    theta = fit(pts, "A")
    assert min(theta) >= 0 and theta[1] == 0


def test_too_few_figures_is_not_estimable():
    pts = _points()
    with pytest.raises(NotEstimable, match="1 figure"):
        fit(pts[:1], "A")
    rows = leave_one_out(pts[:2] + _points(runtime="r:b")[:3], "A")
    lonely = [r for r in rows if r["runtime"] == "r:a"]
    assert all(r["estimate_tok_s"] is None and r["not_estimable"].startswith("not estimable") for r in lonely)
    assert all(r["estimate_tok_s"] is not None for r in rows if r["runtime"] == "r:b")  # control


def test_leave_one_out_never_sees_the_held_out_figure():
    """The fitter is handed only the other figures, and a held-out figure poisoned with NaN
    changes neither its own prediction nor anything else of its row."""
    pts = _points()
    seen = []

    def spy(points, form):
        seen.append([p.key for p in points])
        return fit(points, form)

    rows = leave_one_out(pts, "A", fitter=spy)
    assert [r["key"] for r in rows] == [p.key for p in pts]
    for r, keys in zip(rows, seen, strict=True):
        assert r["key"] not in keys and r["fitted_on"] == keys and len(keys) == len(pts) - 1
    for i, p in enumerate(pts):
        poisoned = pts[:i] + [Point(p.key, p.runtime, p.metric, p.terms, math.nan)] + pts[i + 1:]
        (row,) = leave_one_out(poisoned, "A", only=(p.key,))
        assert row["estimate_tok_s"] == pytest.approx(rows[i]["estimate_tok_s"], rel=1e-12)
    # control: a fit that does include the poisoned figure is poisoned
    bad = pts[:1] + [Point("p1", "r:a", "decode", pts[1].terms, math.nan)] + pts[2:]
    try:
        poisoned = any(math.isnan(v) for v in fit(bad, "A"))
    except np.linalg.LinAlgError:
        poisoned = True
    assert poisoned


def test_leave_one_out_is_not_the_in_sample_fit():
    """Control: a figure off the others' trend is predicted from the others (a miss), while
    the all-figures fit bends towards it."""
    pts = _points()
    odd = Point("odd", "r:a", "decode", {"memory_s": 3e-3, "layer_cycles_s": 1e-6}, 0.05)
    row = leave_one_out(pts + [odd], "A")[-1]
    assert row["ratio"] > 5  # predicted ~6.3 ms vs 50 ms published
    assert predict(fit(pts + [odd], "A"), odd, "A") > predict(fit(pts, "A"), odd, "A")


def test_published_figures_are_sourced_and_resolvable():
    keys = [f.key for f in PUBLISHED]
    assert len(keys) == len(set(keys))
    for f in PUBLISHED:
        assert f.source and f.tok_s > 0 and f.metric in ("decode", "prefill")
        assert f.flow in FLOWS and f.device in DEVICES and (CONFIGS / f.model / "config.json").is_file()


def test_runtimes_carry_the_fit_on_all_figures():
    """runtimes.py's parameters are the fit on every published figure (bench/estimate.py
    writes them; they are copied by hand), and name those figures."""
    fits = api.estimate_fit(CONFIGS)
    assert set(fits) == set(RUNTIMES)
    for key, v in fits.items():
        r = RUNTIMES[key]
        assert (r.eff_bw, r.overhead_cycles, r.eff_compute) == (
            round(v["eff_bw"], 3), round(v["overhead_cycles"], -2), round(v["eff_compute"], 3))
        assert r.figures == tuple(v["decode_figures"] + v["prefill_figures"])
    # control: one figure changed changes the fit
    f0 = PUBLISHED[0]
    moved = (type(f0)(f0.model, f0.flow, f0.device, f0.metric, f0.tok_s * 2, f0.prompt, f0.source),) + PUBLISHED[1:]
    refit = api.estimate_fit(CONFIGS, moved)[f0.runtime]
    assert round(refit["overhead_cycles"], -2) != RUNTIMES[f0.runtime].overhead_cycles


def test_published_leave_one_out_ignores_the_held_out_value():
    """On the real figures, through the API the benchmark uses: changing a figure's published
    value leaves its own leave-one-out estimate unchanged and moves the others' (control)."""
    f0 = PUBLISHED[1]  # Qwen3-0.6B on the Galaxy S22, decode
    moved = tuple(type(f)(f.model, f.flow, f.device, f.metric, f.tok_s * (100 if f is f0 else 1), f.prompt, f.source)
                  for f in PUBLISHED)
    base = {r["key"]: r for r in api.estimate_leave_one_out(CONFIGS, "A")}
    after = {r["key"]: r for r in api.estimate_leave_one_out(CONFIGS, "A", moved)}
    assert after[f0.key]["estimate_tok_s"] == pytest.approx(base[f0.key]["estimate_tok_s"], rel=1e-12)
    others = [k for k, r in base.items() if k != f0.key and r["runtime"] == f0.runtime]
    assert all(after[k]["estimate_tok_s"] != pytest.approx(base[k]["estimate_tok_s"], rel=1e-6) for k in others)
