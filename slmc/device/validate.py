"""`slmc validate OUT --on DEVICE`: the same validation as on the host, run inside the device,
judged on the host against the host's reference under the flow's bounds.

1. choose what host validation runs, with its own code (runtime_tests/validate.py: `plan`):
   the teacher-forced windows (sampled by the reference with its fixed seed, or `--text`;
   `--positions`, `--long`) and the free-running greedy prompt and steps;
2. push the model files, manifest.json, check/ and those choices (`run.npz`: token ids only)
   to the device; run `check/check.py` there (it needs only the target's runtime and numpy):
   the bundle's own steps and verdict, then every row of every window and the greedy steps;
   pull every row's logits;
3. judge them here exactly as host validation judges its own runtime's (teacher.compare_logits,
   validate.conclude / verdict_of: one implementation of the verdict);
4. run the same windows through this host's runtime (the `host` device, the same checker) and
   report the host-vs-device difference.

A phone without a host runs check/check.py alone: the bundle's few steps, judged on the phone
by check/judge.py (a statistical flow is INCONCLUSIVE there, with its reason).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ..compiler.ir import Model
from ..errors import SlmcError
from ..runtime_tests.teacher import compare_logits
from ..runtime_tests.validate import Plan, Report, conclude, plan
from ..targets import target_of
from ..targets.bounds import MIN_POSITIONS, NUDGE
from . import get_device
from .base import Device
from .bundle import CHECK_DIR

# target -> the runtime its checker needs on the device
RUNTIMES = {"executorch": "executorch", "tflite": "ai_edge_litert", "onnx": "onnxruntime"}
TIMEOUT_S = 3600


def _run_file(p: Plan, path: Path) -> None:
    """run.npz: the windows (padded to one length, with their lengths), the greedy prompt and steps."""
    width = max(map(len, p.windows))
    windows = np.zeros((len(p.windows), width), np.int64)
    for i, w in enumerate(p.windows):
        windows[i, :len(w)] = w
    np.savez(path, windows=windows, lengths=np.array([len(w) for w in p.windows], np.int64),
             prompt=np.array(p.ids, np.int64), steps=np.array(p.steps, np.int64))


def run_bundle(folder: Path, device: Device, run: Path | None = None, timeout: float = TIMEOUT_S) -> dict:
    """Run `folder`'s check bundle on `device` (with `run`: also run.npz's windows and greedy
    steps); returns its JSON report with `logits` and `greedy` (the bundle's steps), with
    `run`: `window_logits`, `run_greedy`, `run_greedy_logits`, and the wall seconds."""
    folder = Path(folder)
    bounds = json.loads((folder / CHECK_DIR / "bounds.json").read_text())
    remote = device.workdir()
    try:
        for name in ["manifest.json", CHECK_DIR, *bounds["sha256"]]:
            device.push(folder / name, f"{remote}/art/{name}")
        args = ["result.npz"]
        if run is not None:
            device.push(run, f"{remote}/run.npz")
            args.append("run.npz")
        # result and run paths are relative to the work folder: under `qemu -L` a new file's
        # absolute path would not map into the root filesystem
        r = device.run([device.python, f"{remote}/art/{CHECK_DIR}/check.py", *args], cwd=remote, timeout=timeout)
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode not in (0, 1, 3) or not lines:  # PASS, FAIL, INCONCLUSIVE
            err = [l for l in (r.stderr or r.stdout).strip().splitlines() if l.strip()]
            raise SlmcError(f"the check bundle did not run on {device.describe()} (exit {r.returncode}): "
                            f"{err[-1] if err else 'no output'}"[:500], str(folder))
        report = json.loads(lines[-1])
        if "error" in report:
            return {**report, "seconds_on_device": r.seconds}
        with tempfile.TemporaryDirectory() as tmp:
            device.pull(f"{remote}/result.npz", Path(tmp) / "result.npz")
            with np.load(Path(tmp) / "result.npz") as res:
                report["logits"], report["greedy"] = res["logits"].copy(), res["greedy"].tolist()
                if run is not None:
                    if "window_logits" not in res:
                        raise SlmcError(f"the checker on {device.describe()} ran no windows: the artifact's "
                                        f"check/ predates `validate --on`'s windows; recompile it", str(folder))
                    report["window_logits"] = res["window_logits"].copy()
                    report["run_greedy"] = res["run_greedy"].tolist()
                    report["run_greedy_logits"] = res["run_greedy_logits"].copy()
                    report["run_seconds"] = round(float(res["run_seconds"]), 2)
        report["seconds_on_device"] = r.seconds
        return report
    finally:
        device.cleanup(remote)


def _split(rows: np.ndarray, windows: list[list[int]], where: str) -> list[np.ndarray]:
    """The device's [sum of window lengths, vocab] rows, one array per window."""
    n = sum(map(len, windows))
    if rows.ndim != 2 or rows.shape[0] != n:
        raise SlmcError(f"the check bundle's outputs on {where}: {list(rows.shape)} logit rows, expected {n} "
                        f"(the windows' positions)", "--on")
    return np.split(rows, np.cumsum([len(w) for w in windows])[:-1])


def validate_on(folder: Path, manifest: dict, model: Model, spec: str, steps: int = 32, prompt: str | None = None,
                positions: int = MIN_POSITIONS, long: bool = False, text: Path | None = None) -> Report:
    t0 = time.time()
    folder = Path(folder)
    target = target_of(manifest)
    device = get_device(spec)
    runtime = RUNTIMES.get(target.name)
    if runtime is None:
        raise SlmcError(f"a {target.name} artifact is not validated on {device.name}: its check bundle is "
                        f"{'an XCTest source, run with Xcode on an Apple device' if target.name == 'coreml' else 'absent'}",
                        str(folder))
    why = device.refusal(runtime)
    if why:
        raise SlmcError(f"{target.name} cannot be validated on {device.name}: {why}", str(folder))
    if not (folder / CHECK_DIR / "check.py").is_file():
        raise SlmcError(f"the artifact has no on-device checker ({CHECK_DIR}/check.py): it was compiled by an "
                        f"slmc without check bundles, or its format ({manifest.get('format')}) has none", str(folder))
    p = plan(folder, manifest, model, steps, prompt, None, positions, long, text)
    notes, hard = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run.npz"
        _run_file(p, run)
        dev = run_bundle(folder, device, run)
        if "error" in dev:
            raise SlmcError(f"the check bundle refused to run on {device.describe()}: {dev['error']}", str(folder))
        rows = _split(dev["window_logits"], p.windows, device.describe())
        notes.append(f"on {device.describe()}: checker ran in {dev['seconds_on_device']} s ({dev['run_seconds']} s "
                     f"for {len(p.windows)} windows, {sum(map(len, p.windows))} positions, and {p.steps} greedy "
                     f"steps); the bundle's own {dev.get('steps')} steps: {dev.get('verdict')}")
        if "bundled_program_verified" in dev:
            ok = dev["bundled_program_verified"]
            notes.append(f"ExecuTorch BundledProgram verification (atol {p.exact_max_abs or 0:.3g}): "
                         f"{sum(ok)}/{len(ok)} test cases passed")
            if not all(ok):
                hard.append("ExecuTorch's BundledProgram verification failed")
        versus = None
        if device.name != "host":
            note, versus = _host_vs(folder, run, dev, device.name)
            notes.append(note)
    art, noise = compare_logits(model, p.windows, rows, p.exact_max_abs, NUDGE if p.statistical else None)
    return conclude(folder, manifest, model, p, f"{dev.get('runtime', runtime)} on {device.describe()}", art, noise,
                    dev["run_greedy"], dev["run_greedy_logits"], t0, notes, hard, versus)


def _host_vs(folder: Path, run: Path, dev: dict, name: str) -> tuple[str, dict | None]:
    """The same windows and greedy steps through this host's runtime (the same checker): a note
    and the report's `host_vs_device`."""
    try:
        host = run_bundle(folder, get_device("host"), run)
    except SlmcError as e:
        return f"host vs {name}: not compared, the bundle does not run on this host ({e})", None
    if "window_logits" not in host or np.shape(host["window_logits"]) != np.shape(dev["window_logits"]):
        return f"host vs {name}: not compared ({host.get('error', 'the host returned other shapes')})", None
    d = float(np.abs(host["window_logits"] - dev["window_logits"]).max()) if dev["window_logits"].size else 0.0
    equal = host["run_greedy"] == dev["run_greedy"]
    return (f"host vs {name}: max |Δ| logits {d:.3g} over {len(dev['window_logits'])} teacher-forced positions, "
            f"greedy tokens {'equal' if equal else 'differ'}"), \
        {"device": name, "max_abs": d, "positions": len(dev["window_logits"]), "greedy_equal": equal,
         "host_seconds": host.get("run_seconds")}
