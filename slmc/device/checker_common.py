"""The part every on-device checker shares (copied into `check/` beside judge.py; numpy and
the standard library only): read the bundle, hash the model files, run the steps through
the runtime-specific `step`/`reset`, judge, write `check/result.npz`, print the report.

A checker script defines `open_session(root, manifest)` returning an object with
`step(tokens, start_pos) -> last-position logits` and `reset()` (and `step_all(tokens,
start_pos) -> every row's logits` where the artifact returns every row in one call), then
calls `main(open_session)`.

`check.py RESULT.npz [RUN.npz]`: with RUN.npz (what `slmc validate --on` pushes: teacher-forced
windows of token ids, a greedy prompt and its step count, all chosen on the host as host
validation chooses them), the checker also runs every row of every window teacher-forced
from an empty cache and the free-running greedy steps, and writes all their logits (float32)
to RESULT.npz for the host to judge; the bundle's own steps and verdict come first, as without.
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
    return (np.stack(rows) if rows else np.zeros((0, 0), np.float32)), greedy(session, prompt, len(tokens))[0]


def greedy(session, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Free-running greedy tokens from `prompt` and each step's last-position logits."""
    session.reset()
    out, rows = [], []
    last = session.step(prompt, 0) if steps else None
    for i in range(steps):
        rows.append(np.asarray(last, np.float32).reshape(-1))
        out.append(int(rows[-1].argmax()))
        if i + 1 < steps:
            last = session.step([out[-1]], len(prompt) + i)
    return out, (np.stack(rows) if rows else np.zeros((0, 0), np.float32))


def run_windows(session, windows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Every row's logits of every window, each from position 0 with an empty cache: one
    all-rows call where the session has one, else one token per step (the decode path)."""
    out = []
    for w, n in zip(windows, lengths):
        ids = [int(t) for t in w[:n]]
        session.reset()
        if hasattr(session, "step_all"):
            rows = np.asarray(session.step_all(ids, 0), np.float32)
        else:
            rows = np.stack([np.asarray(session.step([t], i), np.float32).reshape(-1) for i, t in enumerate(ids)])
        out.append(rows.reshape(len(ids), -1))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


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
    logits, greedy_tokens = run_steps(session, prompt, tokens)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "result.npz"
    arrays = {"logits": logits, "greedy": np.array(greedy_tokens, np.int64)}
    if len(sys.argv) > 2:  # the host's teacher-forced windows and greedy run (slmc validate --on)
        with np.load(sys.argv[2]) as run:  # arrays only: np.load refuses pickles by default
            t = time.time()
            arrays["window_logits"] = run_windows(session, run["windows"], run["lengths"])
            run_tokens, arrays["run_greedy_logits"] = greedy(session, run["prompt"].tolist(), int(run["steps"]))
            arrays["run_greedy"] = np.array(run_tokens, np.int64)
            arrays["run_seconds"] = np.array(time.time() - t)
    np.savez(out, **arrays)
    report = judge(logits, exp["logits"], greedy_tokens, tokens, bounds)
    report.update(extra)
    if not all(extra.get("bundled_program_verified", [True])):
        report.update(passed=False, verdict="FAIL", reasons=["ExecuTorch's BundledProgram verification failed"])
    report["runtime"] = getattr(session, "runtime", "?")
    report["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(report))
    return {"PASS": 0, "INCONCLUSIVE": 3}.get(report.get("verdict"), 1)
