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


def judge(got: np.ndarray, expected: np.ndarray, greedy: list[int], ref_tokens: list[int], bounds: dict) -> dict:
    """got, expected: [steps, vocab] logits; greedy: the artifact's free-running tokens;
    bounds: {"max_abs", "min_top1", "greedy_equal"}. Returns the report as a dict."""
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    if got.shape != expected.shape:
        return {"passed": False, "error": f"logits shape {list(got.shape)} != expected {list(expected.shape)}"}
    diffs = np.abs(got - expected).max(axis=1) if got.size else np.zeros(0)
    agree = ties = 0
    for i in range(len(got)):
        a, b = int(got[i].argmax()), int(expected[i].argmax())
        if a == b:
            agree += 1
        elif diffs[i] <= bounds["max_abs"] and float(expected[i][b] - expected[i][a]) <= 2 * diffs[i]:
            ties += 1
    steps = max(len(got), 1)
    greedy, ref_tokens = [int(t) for t in greedy], [int(t) for t in ref_tokens]
    div = next((i for i, (a, b) in enumerate(zip(greedy, ref_tokens)) if a != b), None)
    equal = greedy == ref_tokens
    top1 = (agree + ties) / steps
    prefill = float(diffs[0]) if len(diffs) else 0.0
    decode = float(diffs[1:].max()) if len(diffs) > 1 else 0.0
    passed = (max(prefill, decode) <= bounds["max_abs"] and top1 >= bounds["min_top1"]
              and (equal or not bounds["greedy_equal"]) and np.isfinite(got).all())
    return {"passed": bool(passed), "prefill_max_abs": prefill, "decode_max_abs": decode, "top1_agreement": top1,
            "near_ties": ties, "greedy_equal": equal, "first_divergence": div, "steps": len(got),
            "greedy": greedy, "bounds": dict(bounds)}
