"""The part every on-device checker shares (copied into `check/` beside judge.py; numpy and
the standard library only): read the bundle, hash the model files, run the steps through
the runtime-specific `step`/`reset`, judge, write `check/result.npz`, print the report.

A checker script defines `open_session(root, manifest)` returning an object with
`step(tokens, start_pos) -> last-position logits` and `reset()`, then calls `main(open_session)`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from judge import judge

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_steps(session, prompt: list[int], tokens: list[int]) -> tuple[np.ndarray, list[int]]:
    """Teacher-forced logits on the reference's tokens, then free-running greedy tokens."""
    rows = []
    for i in range(len(tokens)):
        got = session.step(prompt, 0) if i == 0 else session.step([tokens[i - 1]], len(prompt) + i - 1)
        rows.append(np.asarray(got, np.float32).reshape(-1))
    session.reset()
    out: list[int] = []
    last = session.step(prompt, 0)
    for i in range(len(tokens)):
        out.append(int(np.asarray(last).argmax()))
        if i + 1 < len(tokens):
            last = session.step([out[-1]], len(prompt) + i)
    return (np.stack(rows) if rows else np.zeros((0, 0), np.float32)), out


def main(open_session) -> int:
    t0 = time.time()
    bounds = json.loads((HERE / "bounds.json").read_text())
    manifest = json.loads((ROOT / "manifest.json").read_text())
    for name, sha in bounds["sha256"].items():  # the artifact checked is the one the bundle was made for
        got = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()
        if got != sha:
            print(json.dumps({"passed": False, "error": f"{name} differs from the compiled artifact "
                                                        f"(sha256 {got[:12]} != {sha[:12]})"}))
            return 1
    exp = np.load(HERE / "expected.npz")
    prompt, tokens = exp["prompt"].tolist(), exp["tokens"].tolist()
    session = open_session(ROOT, manifest)
    # the runtime's own bundle tooling first, where it has one (ExecuTorch's BundledProgram)
    extra = session.verify_bundle() if hasattr(session, "verify_bundle") else {}
    logits, greedy = run_steps(session, prompt, tokens)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "result.npz"
    np.savez(out, logits=logits, greedy=np.array(greedy, np.int64))
    report = judge(logits, exp["logits"], greedy, tokens, bounds)
    report.update(extra)
    if not all(extra.get("bundled_program_verified", [True])):
        report.update(passed=False, verdict="FAIL", reasons=["ExecuTorch's BundledProgram verification failed"])
    report["runtime"] = getattr(session, "runtime", "?")
    report["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(report))
    return {"PASS": 0, "INCONCLUSIVE": 3}.get(report.get("verdict"), 1)
