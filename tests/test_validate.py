"""validate's acceptance rules (issue 14): fixed bounds per flow kind, the verdict and its
exit codes, the statistics over teacher-forced windows, the CLI's table."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from slmc import api, cli
from slmc.errors import ValidationFailed, ValidationInconclusive
from slmc.runtime_tests import validate as v
from slmc.runtime_tests.teacher import Agreement, sample_windows, text_windows
from slmc.targets import TARGETS, load_all
from slmc.targets.bounds import ACT8_STATISTICAL, FLOAT_EXACT, FP16_STATISTICAL, MIN_POSITIONS

load_all()


def agreement(n: int, shift: float = 0.0, flip: int = 0, exact: float | None = None) -> Agreement:
    """n rows of random logits against the same logits + shift on one token (+ `flip` rows with
    their argmax moved to another token)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(n, 32, generator=g) * 3
    sub = ref.clone()
    sub[:, 0] += shift
    for i in range(flip):
        sub[i, (int(ref[i].argmax()) + 1) % 32] = ref[i].max() + 1
    a = Agreement(exact)
    a.add(ref, sub, torch.randint(0, 32, (n,), generator=g).tolist())
    return a


def test_statistics_of_identical_logits():
    a = agreement(64)
    assert a.rows == 64 and a.scored == 63 and a.top1 == 1.0 and a.max_abs == 0.0
    assert a.mean_kl == 0.0 and a.delta_ppl == 0.0 and a.ref_ppl == a.sub_ppl


def test_statistics_see_a_shifted_logit():
    a = agreement(64, shift=0.5, flip=4)
    assert a.top1 == 60 / 64 and a.max_abs > 0.5 and a.mean_kl > 1e-3
    assert math.isclose(a.delta_ppl, a.sub_ppl / a.ref_ppl - 1, rel_tol=1e-9)


def test_near_ties_count_only_under_the_exact_rule():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(4, 16, generator=g)
    top2 = ref.topk(2, -1)
    ref[0, top2.indices[0, 1]] = top2.values[0, 0] - 1e-4  # row 0: a near tie
    sub = ref.clone()
    sub[0, top2.indices[0, 1]] += 2e-4  # swaps the near tie: |Δ| 2e-4, gap 1e-4
    exact, plain = Agreement(FLOAT_EXACT.max_abs), Agreement()
    exact.add(ref, sub, [0, 1, 2, 3])
    plain.add(ref, sub, [0, 1, 2, 3])
    assert exact.top1 == 1.0 and exact.ties == 1 and plain.top1 == 0.75


def test_text_windows_split_the_users_text():
    assert text_windows(list(range(10)), 3, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert text_windows(list(range(10)), 1, 4) == [[0, 1, 2, 3]]
    assert text_windows([5], 3, 4) == []


def test_sampled_windows_share_no_row(tiny_llama_dir):
    """Only the first window starts with the prompt; the others start from distinct tokens
    (none the first window's), so no row (its logits depend on the tokens up to it) repeats
    and the bounds count distinct positions. Deterministic under the fixed seed."""
    model = api.load(str(tiny_llama_dir), max_seq_len=48)
    prompt = list(range(10, 22))
    w = sample_windows(model, prompt, 11, 47, seed=0)
    assert len(w) == 11 and all(len(x) == 47 for x in w)
    assert w[0][:11] == prompt[:11]  # up to a quarter of the window
    assert len({x[0] for x in w}) == 11  # distinct first tokens: no shared row 0, nor any later row
    assert sample_windows(model, prompt, 11, 47, seed=0) == w
    assert sample_windows(model, prompt, 11, 47, seed=1) != w
    assert sample_windows(model, prompt, 1, 47, seed=0) == w[:1]  # the first window alone is the same


def test_bounds_are_fixed_per_flow_kind():
    """Every listed bound is one of the published ones, and no flow is judged by a bound that
    depends on the run (there is no such field any more)."""
    published = {FLOAT_EXACT, ACT8_STATISTICAL, FP16_STATISTICAL}
    for target in TARGETS.values():
        for key, tol in target.tolerances.items():
            assert tol in published, (target.name, key)
    assert ACT8_STATISTICAL.min_positions == FP16_STATISTICAL.min_positions == MIN_POSITIONS == 512
    assert not hasattr(FLOAT_EXACT, "noise_floor")
    assert TARGETS["executorch"].tolerances[("xnnpack", "quant-act8")] is ACT8_STATISTICAL
    assert TARGETS["tflite"].tolerances[("cpu", "quant-act8")] is ACT8_STATISTICAL
    assert TARGETS["coreml"].tolerances[("fp16", "quant")] is FP16_STATISTICAL


def judge(tol, art, noise=None, greedy=True, max_abs=0.0):
    return v._judge(tol, "t/b, kind", art, noise, greedy, max_abs)


def test_verdicts():
    ok, bad = agreement(MIN_POSITIONS), agreement(MIN_POSITIONS, shift=0.5, flip=20)
    assert judge(ACT8_STATISTICAL, ok)[0] == "PASS"
    verdict, reasons = judge(ACT8_STATISTICAL, bad)
    assert verdict == "FAIL" and any("mean KL" in r for r in reasons) and any("top-1" in r for r in reasons)
    # the reference's own noise above the bound: INCONCLUSIVE, never PASS, whatever the artifact did
    for art in (ok, bad):
        verdict, reasons = judge(ACT8_STATISTICAL, art, noise=bad)
        assert verdict == "INCONCLUSIVE" and "noise floor" in reasons[0]
    assert judge(ACT8_STATISTICAL, ok, noise=ok)[0] == "PASS"
    # too few positions for a statistical PASS; a FAIL stays a FAIL
    assert judge(ACT8_STATISTICAL, agreement(100))[0] == "INCONCLUSIVE"
    assert judge(ACT8_STATISTICAL, agreement(100, shift=0.5, flip=20))[0] == "FAIL"
    # the exact rule: |Δ| and greedy equality
    assert judge(FLOAT_EXACT, ok)[0] == "PASS"
    assert judge(FLOAT_EXACT, ok, max_abs=3e-3)[0] == "FAIL"
    assert judge(FLOAT_EXACT, ok, greedy=False)[1] == ["greedy tokens differ from the reference's"]
    assert judge(replace(ACT8_STATISTICAL, greedy_equal=True), ok, greedy=False)[0] == "FAIL"
    # a flow with no published bound
    assert judge(None, ok)[0] == "INCONCLUSIVE"


def fake_report(verdict: str, **kw) -> v.Report:
    fields = dict(artifact="a", runtime="r", prompt_tokens=12, decode_steps=8, prefill_max_abs=0.01,
                  decode_max_abs=0.02, top1_agreement=0.875, greedy_equal=False, reference_text="x",
                  artifact_text="y", tolerance={**ACT8_STATISTICAL.__dict__}, passed=verdict == "PASS", seconds=1.0,
                  first_divergence=3, notes=["a note"], verdict=verdict, reasons=["the reason"], flow="t/b, kind",
                  positions=512, windows=2, window_len=256, text_source="sampled", mean_kl=2e-4, delta_ppl=0.001,
                  reference_ppl=10.0, artifact_ppl=10.01,
                  noise_floor={"mean_kl": 1e-6, "top1": 1.0, "delta_ppl": 0.0, "nudge": 1e-7})
    fields.update(kw)
    return v.Report(**fields)


def test_require_pass_raises_by_verdict():
    api.require_pass(fake_report("PASS"))
    with pytest.raises(ValidationFailed, match="the reason") as e:
        api.require_pass(fake_report("FAIL"))
    assert e.value.exit_code == 1
    with pytest.raises(ValidationInconclusive, match="inconclusive.*the reason") as e:
        api.require_pass(fake_report("INCONCLUSIVE"))
    assert e.value.exit_code == 3


@pytest.mark.parametrize("verdict,code", [("PASS", 0), ("FAIL", 1), ("INCONCLUSIVE", 3)])
def test_cli_exit_codes_and_table(verdict, code, monkeypatch, tmp_path):
    seen = {}

    def fake_validate(artifact, opts):
        seen["opts"] = opts
        return fake_report(verdict)

    monkeypatch.setattr(api, "validate", fake_validate)
    text = tmp_path / "t.txt"
    text.write_text("hello")
    res = CliRunner().invoke(cli.main, ["validate", str(tmp_path), "--long", "--positions", "600", "--text", str(text)],
                             terminal_width=200)
    assert res.exit_code == code, res.output
    assert "87.5%" in res.output and "88%" not in res.output  # one decimal
    assert "the reason" in res.output and "a note" in res.output and verdict in res.output
    assert "noise floor" in res.output
    opts = seen["opts"]
    assert opts.long and opts.positions == 600 and str(opts.text) == str(text)


def test_cli_default_is_512_positions(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(api, "validate", lambda a, opts: seen.setdefault("o", opts) and fake_report("PASS"))
    CliRunner().invoke(cli.main, ["validate", str(tmp_path)])
    assert seen["o"].positions == 512 and not seen["o"].long and seen["o"].text is None


def test_long_mode_runs_past_the_ring_wrap_to_the_end_of_the_cache(tiny_llama_dir, tmp_path):
    """--long: windows as long as the cache (max_len − 1), so a ring cache of 16 slots wraps
    several times inside every window; every row compared; --text feeds the user's text."""
    out, manifest = api.compile_model(tiny_llama_dir, "executorch", "xnnpack", tmp_path / "a", max_seq_len=40,
                                      passes=["kv.cache:window=16,sink_tokens=4"])
    report = api.validate_artifact(out, steps=8, long=True, positions=60, record=False)
    assert report.verdict == "PASS", report.to_json()
    assert report.window_len == 39 and report.windows == 2 and report.positions == 78
    assert "sampled by the reference" in report.text_source
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and looked at the dog. " * 4)
    report = api.validate_artifact(out, steps=8, positions=30, text=text, record=False)
    assert report.verdict == "PASS" and str(text) in report.text_source
    assert report.window_len == 30 and report.positions == 30


def test_changed_codes_fail_whatever_the_bound():
    ok = agreement(MIN_POSITIONS)
    verdict, reasons = v._judge(None, "t/b, quant", ok, None, True, 0.0, ["2 of 9 quantized weights are not stored"])
    assert verdict == "FAIL" and reasons == ["2 of 9 quantized weights are not stored"]
