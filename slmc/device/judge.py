"""The verdict of an on-device check: the artifact's logits and greedy tokens against the
reference's, under the flow's fixed bounds. Numpy only and no slmc import: this file is
copied into every artifact's `check/` folder, where the checker imports it on the device,
and slmc imports it on the host to judge what a device sent back (one implementation).

The comparison is the one `slmc validate` makes: max |Δ| of each step's last-position
logits, top-1 agreement (a step whose argmax differs counts as agreeing when the
reference ranks the two tokens closer than twice that step's error and the error is
within bound: a near tie), and the free-running greedy tokens.
"""

from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def judge(got: np.ndarray, expected: np.ndarray, greedy: list[int], ref_tokens: list[int], bounds: dict) -> dict:
    """got, expected: [steps, vocab] logits; greedy: the artifact's free-running tokens;
    bounds: the flow's Tolerance as a dict (targets/bounds.py). Returns the report as a dict
    with a verdict: PASS, FAIL or INCONCLUSIVE (a statistical bound needs more positions than
    the bundle holds, or the flow has no bound)."""
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    if got.shape != expected.shape:
        return {"passed": False, "verdict": "FAIL",
                "error": f"logits shape {list(got.shape)} != expected {list(expected.shape)}"}
    rule, max_abs = bounds.get("rule", "none"), bounds.get("max_abs")
    diffs = np.abs(got - expected).max(axis=1) if got.size else np.zeros(0)
    agree = ties = 0
    for i in range(len(got)):
        a, b = int(got[i].argmax()), int(expected[i].argmax())
        if a == b:
            agree += 1
        elif rule == "exact" and diffs[i] <= max_abs and float(expected[i][b] - expected[i][a]) <= 2 * diffs[i]:
            ties += 1
    steps = max(len(got), 1)
    greedy, ref_tokens = [int(t) for t in greedy], [int(t) for t in ref_tokens]
    div = next((i for i, (a, b) in enumerate(zip(greedy, ref_tokens)) if a != b), None)
    equal = greedy == ref_tokens
    top1 = (agree + ties) / steps
    prefill = float(diffs[0]) if len(diffs) else 0.0
    decode = float(diffs[1:].max()) if len(diffs) > 1 else 0.0
    report = {"prefill_max_abs": prefill, "decode_max_abs": decode, "top1_agreement": top1, "near_ties": ties,
              "greedy_equal": equal, "first_divergence": div, "steps": len(got), "greedy": greedy,
              "bounds": dict(bounds)}
    fails, unsure = [], []
    if not np.isfinite(got).all():
        fails.append("non-finite logits")
    if top1 < bounds.get("min_top1", 1.0):
        fails.append(f"top-1 {top1:.1%} < {bounds.get('min_top1', 1.0):.1%}")
    if bounds.get("greedy_equal", True) and not equal:
        fails.append(f"greedy tokens differ from step {div}")
    if rule == "exact":
        if max(prefill, decode) > max_abs:
            fails.append(f"max |Δ| {max(prefill, decode):.3g} > {max_abs:.3g}")
    elif rule == "statistical" and len(got):
        # teacher-forced step i predicts the reference's greedy token i
        lr, la = _log_softmax(expected), _log_softmax(got)
        kl = float((np.exp(lr) * (lr - la)).sum(axis=-1).mean())
        idx = np.arange(len(got)), np.asarray(ref_tokens[:len(got)])
        dppl = float(np.exp(-la[idx].mean()) / np.exp(-lr[idx].mean()) - 1)
        report.update(mean_kl=kl, delta_ppl=dppl)
        if kl > bounds["max_kl"]:
            fails.append(f"mean KL {kl:.3g} > {bounds['max_kl']:.3g}")
        if abs(dppl) > bounds["max_dppl"]:
            fails.append(f"|Δppl| {abs(dppl):.3%} > {bounds['max_dppl']:.2%}")
        if len(got) < bounds.get("min_positions", 0):
            unsure.append(f"the bundle holds {len(got)} positions; this flow's statistical bound needs "
                          f"{bounds['min_positions']} (the host's `slmc validate` judges it)")
    else:
        unsure.append("this flow has no published bound")
    verdict = "FAIL" if fails else "INCONCLUSIVE" if unsure else "PASS"
    report.update(passed=verdict == "PASS", verdict=verdict, reasons=fails or unsure)
    return report
