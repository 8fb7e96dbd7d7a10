"""`slmc validate OUT --on DEVICE`: the artifact's own check bundle (`check/`), run inside the
device, judged on the host against the host's reference executor under the flow's bounds.

1. push the model files, manifest.json and check/ to the device; run `check/check.py`
   there (it needs only the target's runtime and numpy) and pull its logits and tokens;
2. recompute the reference's greedy tokens and logits for the bundle's prompt here, with
   the bounds of the target's tolerance table (targets/bounds.py), and judge the device's
   outputs with the same comparison `slmc validate` makes (device/judge.py);
3. run the same bundle on this host too (the `host` device) and report the host-vs-device
   difference of the logits and greedy tokens.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..compiler import reference
from ..compiler.ir import Model
from ..errors import SlmcError
from ..runtime_tests.validate import Report, load_tokenizer
from ..targets import target_of
from . import get_device
from .base import Device
from .bundle import CHECK_DIR, bounds_for
from .judge import judge

# target -> the runtime its checker needs on the device
RUNTIMES = {"executorch": "executorch", "tflite": "ai_edge_litert", "onnx": "onnxruntime"}
TIMEOUT_S = 3600


def run_bundle(folder: Path, device: Device, timeout: float = TIMEOUT_S) -> dict:
    """Run `folder`'s check bundle on `device`; returns its JSON report with `logits` and
    `greedy` (what the device computed) and the wall seconds of the run."""
    folder = Path(folder)
    bounds = json.loads((folder / CHECK_DIR / "bounds.json").read_text())
    remote = device.workdir()
    try:
        for name in ["manifest.json", CHECK_DIR, *bounds["sha256"]]:
            device.push(folder / name, f"{remote}/art/{name}")
        # the result path is relative to the work folder: under `qemu -L` a new file's absolute
        # path would not map into the root filesystem
        r = device.run([device.python, f"{remote}/art/{CHECK_DIR}/check.py", "result.npz"], cwd=remote,
                       timeout=timeout)
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
        report["seconds_on_device"] = r.seconds
        return report
    finally:
        device.cleanup(remote)


def validate_on(folder: Path, manifest: dict, model: Model, spec: str) -> Report:
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
    with np.load(folder / CHECK_DIR / "expected.npz") as exp:
        prompt, bundled = exp["prompt"].tolist(), exp["logits"].copy()
    # the host's reference on the bundle's prompt, the flow's bounds
    with torch.no_grad():
        tokens, logits = reference.greedy(model, prompt, len(bundled))
    expected = torch.stack([l.float() for l in logits]).numpy()
    bounds = bounds_for(model, target.tolerance(manifest), prompt, tokens)
    notes = list(bounds.pop("notes"))
    if bundled.shape != expected.shape or float(np.abs(bundled - expected).max()) > 1e-4:
        notes.append("the bundle's expected outputs differ from this host's reference (judged against the host's)")

    dev = run_bundle(folder, device)
    if "error" in dev:
        raise SlmcError(f"the check bundle refused to run on {device.describe()}: {dev['error']}", str(folder))
    verdict = judge(dev["logits"], expected, dev["greedy"], tokens, bounds)
    if "error" in verdict:  # the device's outputs do not even have the reference's shape
        raise SlmcError(f"the check bundle's outputs on {device.describe()}: {verdict['error']}", str(folder))
    notes.append(f"on {device.describe()}: checker ran in {dev['seconds_on_device']} s, its own verdict "
                 f"{'PASS' if dev['passed'] else 'FAIL'}")
    if "bundled_program_verified" in dev:
        ok = dev["bundled_program_verified"]
        notes.append(f"ExecuTorch BundledProgram verification (atol {bounds['max_abs']:.3g}): {sum(ok)}/{len(ok)} "
                     "test cases passed")
        if not all(ok):
            verdict.update(passed=False, verdict="FAIL",
                           reasons=verdict["reasons"] * (verdict["verdict"] == "FAIL")
                           + ["ExecuTorch's BundledProgram verification failed"])
    if device.name != "host":
        try:
            host = run_bundle(folder, get_device("host"))
        except SlmcError as e:
            host = {}
            notes.append(f"host vs {device.name}: not compared, the bundle does not run on this host ({e})")
        if "logits" in host and np.shape(host["logits"]) == np.shape(dev["logits"]):
            d = float(np.abs(np.asarray(host["logits"]) - np.asarray(dev["logits"])).max())
            notes.append(f"host vs {device.name}: max |Δ| logits {d:.3g}, greedy tokens "
                         f"{'equal' if host['greedy'] == dev['greedy'] else 'differ'}")
    tok = load_tokenizer(folder)
    text = (lambda ids: tok.decode(ids, skip_special_tokens=False)) if tok else (lambda ids: " ".join(map(str, ids)))
    return Report(
        artifact=str(folder), runtime=f"{dev.get('runtime', runtime)} on {device.describe()}",
        prompt_tokens=len(prompt), decode_steps=len(tokens), prefill_max_abs=verdict["prefill_max_abs"],
        decode_max_abs=verdict["decode_max_abs"], top1_agreement=verdict["top1_agreement"],
        greedy_equal=verdict["greedy_equal"], reference_text=text(tokens), artifact_text=text(dev["greedy"]),
        tolerance=dict(bounds),
        passed=bool(verdict["passed"]), seconds=round(time.time() - t0, 2),
        first_divergence=verdict["first_divergence"], notes=notes, verdict=verdict["verdict"],
        reasons=list(verdict["reasons"]), flow=bounds.get("flow", ""), positions=verdict["steps"],
        mean_kl=verdict.get("mean_kl", 0.0), delta_ppl=verdict.get("delta_ppl", 0.0))
