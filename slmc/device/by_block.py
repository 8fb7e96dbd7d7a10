"""`slmc validate OUT --by-block --on DEVICE`: the block-isolated check
(runtime_tests/isolated.py) with the artifact's debug program run INSIDE the device.

1. the host compiles the artifact's debug program from its IR with the manifest's spec (the
   one `slmc diff` runs: ExecuTorch's debug .pte, targets/executorch/intermediates.py
   `debug_program`; LiteRT's debug .tflite, TFLiteTarget.debug_program), static T = the
   prompt's length;
2. it pushes the artifact (manifest, model files, check/), the debug program, the prompt's ids
   (`ids.npz`) and the runtime's script (`et_states.py`, `litert_states.py`); that script runs
   the debug program and, with the artifact's own checker session (check/check.py), the
   artifact on the same ids inside the device; the per-stage states come back as an .npz;
3. the host feeds the reference's blocks with the device's states and judges them
   (isolated.judge: the one verdict for host and device);
4. the same script on this host (the `host` device) gives the host-vs-device difference of
   the states, per stage.

ExecuTorch and LiteRT; other targets are refused with the reason (no device script).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..compiler.ir import Model
from ..errors import SlmcError
from ..runtime_tests import isolated
from ..runtime_tests.diff import artifact_bound
from ..targets import target_of
from . import get_device
from .base import Device
from .bundle import CHECK_DIR

HERE = Path(__file__).parent
# target -> (the runtime the device needs, the debug program's file name, the script that runs it)
RUNNERS = {"executorch": ("executorch", "debug.pte", HERE / "et_states.py"),
           "tflite": ("ai_edge_litert", "debug.tflite", HERE / "litert_states.py")}
TIMEOUT_S = 3600


def debug_program(target, model: Model, manifest: dict, ids: list[int]) -> tuple[bytes, str]:
    if target.name == "executorch":
        from ..targets.executorch.intermediates import debug_program as et_debug

        return et_debug(model, manifest, ids)
    return target.debug_program(model, manifest, ids)


def run_states(folder: Path, manifest: dict, device: Device, debug: bytes, ids: list[int],
               target: str = "executorch", timeout: float = TIMEOUT_S) -> dict:
    """The debug program's states and logits and the artifact's own last row, run on `device`."""
    bounds = json.loads((folder / CHECK_DIR / "bounds.json").read_text())
    _, name, script = RUNNERS[target]
    remote = device.workdir()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(debug)
            np.savez(Path(tmp) / "ids.npz", ids=np.array(ids, np.int64))
            for f in ["manifest.json", CHECK_DIR, *bounds["sha256"]]:
                device.push(folder / f, f"{remote}/art/{f}")
            for p in (Path(tmp) / name, Path(tmp) / "ids.npz", script):
                device.push(p, f"{remote}/{p.name}")
        # relative paths inside the work folder (under `qemu -L` a new file's absolute path
        # would not map into the root filesystem)
        r = device.run([device.python, f"{remote}/{script.name}", name, "ids.npz", "states.npz", "art"],
                       cwd=remote, timeout=timeout)
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode or not lines:
            err = [l for l in (r.stderr or r.stdout).strip().splitlines() if l.strip()]
            raise SlmcError(f"the debug program did not run on {device.describe()} (exit {r.returncode}): "
                            f"{err[-1] if err else 'no output'}"[:500], str(folder))
        out = {**json.loads(lines[-1]), "seconds_on_device": r.seconds}
        with tempfile.TemporaryDirectory() as tmp:
            device.pull(f"{remote}/states.npz", Path(tmp) / "states.npz")
            with np.load(Path(tmp) / "states.npz") as f:
                out.update(states=torch.from_numpy(f["states"].copy()), logits=torch.from_numpy(f["logits"].copy()),
                           own_last=torch.from_numpy(f["own_last"].copy()))
        return out
    finally:
        device.cleanup(remote)


def artifact_check(own_last: torch.Tensor, debug_logits: torch.Tensor, manifest: dict, where: str) -> dict:
    """The debug program's last logits row vs the artifact's own session, both on `where`
    (diff's check, under the flow's end-to-end diff bound)."""
    bound, _ = artifact_bound(manifest)
    dbg = debug_logits[-1].double()
    rel = float((own_last.double() - dbg).norm() / dbg.norm().clamp_min(1e-30))
    return {"max_abs": float((own_last.double() - dbg).abs().max()), "rel_rms": rel, "bound": bound,
            "matches": rel <= bound, "what": f"the debug program's last logits row vs the artifact's own session on "
                                             f"the same prompt, both on {where}"}


def by_block_on(folder: Path, manifest: dict, model: Model, ids: list[int], spec: str) -> isolated.IsolatedReport:
    t0 = time.time()
    folder = Path(folder)
    target = target_of(manifest)
    if target.name not in RUNNERS or manifest.get("format") not in ("pte", "tflite"):
        raise SlmcError(f"validate --by-block --on runs ExecuTorch .pte and LiteRT .tflite artifacts only (this is "
                        f"{target.name}, {manifest.get('format')}): its debug variant has no device script; "
                        "`slmc validate --by-block` without --on judges it on this host", str(folder))
    runtime = RUNNERS[target.name][0]
    device = get_device(spec)
    why = device.refusal(runtime)
    if why:
        raise SlmcError(f"{runtime} cannot run on {device.name}: {why}", str(folder))
    if not (folder / CHECK_DIR / "check.py").is_file():
        raise SlmcError(f"the artifact has no on-device checker ({CHECK_DIR}/check.py), whose session runs the "
                        "artifact on the device; recompile it", str(folder))
    debug, how = debug_program(target, model, manifest, ids)
    dev = run_states(folder, manifest, device, debug, ids, target.name)
    where = device.describe()
    bound, why = isolated.isolated_bound(manifest)
    check = artifact_check(dev["own_last"], dev["logits"], manifest, where)
    r = isolated.judge(model, ids, dev["states"], dev["logits"], bound, why, str(folder), f"{runtime} on {where}",
                       f"{how}, run on {where}", check, t0)
    r.notes.append(f"on {where}: the debug program and the artifact itself ran in {dev['seconds_on_device']} s")
    names = isolated.stage_names(model)
    try:
        host = run_states(folder, manifest, get_device("host"), debug, ids, target.name)
    except SlmcError as e:
        r.notes.append(f"host vs {device.name}: not compared, the debug program does not run on this host ({e})")
        return r
    r.host_vs_device = {"device": device.name, **isolated.states_delta(
        list(host["states"]) + [host["logits"]], list(dev["states"]) + [dev["logits"]], names)}
    r.notes.append(f"host vs {device.name}: the same debug program's states differ by max |Δ| "
                   f"{r.host_vs_device['max_abs']:.3g} (max rel RMS {r.host_vs_device['max_rel_rms']:.3g} over "
                   f"{len(names)} stages)")
    return r
