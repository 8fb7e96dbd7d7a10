"""`slmc validate --on DEVICE` judges an int8-activation flow statistically, as host validation
does: the host's teacher-forced windows run inside the device (here the `host` transport: the
same push / run / pull, the same checker script, this machine's runtime), every row's logits
come back and are judged by the same verdict. An honest 8da4w artifact PASSes; a broken one
(one layer's weight scales x1.5, the break tests/test_broken_artifacts.py uses) FAILs, and the
device's own numbers are outside the bound (not only the codes check)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

from slmc import api
from test_broken_artifacts import ACT8, scale_one_layer

MAX_LEN = 48


@pytest.fixture(scope="module")
def honest_ir(tiny_llama_dir):
    ir, _ = api.run_passes(api.load(str(tiny_llama_dir), max_seq_len=MAX_LEN), (ACT8,))
    return ir


def _compile(ir, tiny_llama_dir, out):
    # LiteRT: the 8da4w flow that compiles fastest here (ExecuTorch's takes minutes; the emulator
    # tests run both targets through this same path)
    folder, _ = api.compile_ir(ir, "tflite", "cpu", out, tokenizer=tiny_llama_dir)
    return folder


def test_statistical_device_path_passes_honest_and_fails_broken(honest_ir, tiny_llama_dir, tmp_path):
    honest = _compile(honest_ir, tiny_llama_dir, tmp_path / "honest")
    r = api.validate(honest, api.ValidateOptions(on="host", record=False), model=honest_ir)
    print(r.verdict, r.positions, r.mean_kl, r.delta_ppl, r.top1_agreement, r.reasons)
    assert r.tolerance["rule"] == "statistical" and r.positions >= r.tolerance["min_positions"]
    assert r.verdict == "PASS", r.reasons
    assert "on host" in r.runtime and any(n.startswith("on host: checker ran") for n in r.notes)
    # the device run is the host run: the same windows, the same numbers
    h = api.validate(honest, api.ValidateOptions(record=False), model=honest_ir)
    assert (h.positions, h.windows, h.window_len) == (r.positions, r.windows, r.window_len)
    assert abs(h.mean_kl - r.mean_kl) <= 1e-6 and h.top1_agreement == r.top1_agreement and h.verdict == r.verdict

    # --positions and --long reach the device: windows as long as the cache, as host validate makes them
    lg = api.validate(honest, api.ValidateOptions(on="host", positions=100, long=True, record=False), model=honest_ir)
    assert (lg.window_len, lg.windows, lg.positions) == (MAX_LEN - 1, 3, 3 * (MAX_LEN - 1))
    assert lg.verdict == "INCONCLUSIVE" and any("positions" in x for x in lg.reasons), lg.reasons

    broken_ir = copy.deepcopy(honest_ir)
    scale_one_layer(broken_ir)
    broken = _compile(broken_ir, tiny_llama_dir, tmp_path / "broken")
    b = api.validate(broken, api.ValidateOptions(on="host", record=False), model=honest_ir)
    print(b.verdict, b.positions, b.mean_kl, b.delta_ppl, b.top1_agreement, b.reasons)
    assert b.verdict == "FAIL"
    tol = b.tolerance
    assert b.mean_kl > tol["max_kl"] or b.top1_agreement < tol["min_top1"] or abs(b.delta_ppl) > tol["max_dppl"]

    # a phone without a host: the bundle alone stays INCONCLUSIVE for a statistical flow, with its reason
    p = subprocess.run([sys.executable, str(honest / "check" / "check.py"), str(tmp_path / "alone.npz")],
                       capture_output=True, text=True)
    alone = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 3 and alone["verdict"] == "INCONCLUSIVE", p.stdout + p.stderr
    assert any("positions" in x for x in alone["reasons"])
    with np.load(tmp_path / "alone.npz") as res:
        assert "window_logits" not in res.files
