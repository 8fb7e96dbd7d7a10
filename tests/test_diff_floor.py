"""`slmc diff` against the reference: a stage past the bound where the reference's own noise
floor (a rounding-size nudge of its embeddings) is past it too is INCONCLUSIVE, not FAIL, as
`slmc validate` rules; a floor under the bound leaves the FAIL standing."""

from __future__ import annotations

import torch

from slmc import api
from slmc.compiler import reference
from slmc.runtime_tests import diff as d

NAMES = ["embedding", "block 0", "final norm", "logits"]


def _side(kind: str, states: torch.Tensor, logits: torch.Tensor) -> d.Side:
    return d.Side(kind, kind, "test", "test", 0.05 if kind == "artifact" else 0.0, "test", states, logits)


def _pair(shift: float):
    g = torch.Generator().manual_seed(0)
    states, logits = torch.randn(3, 4, 8, generator=g), torch.randn(4, 16, generator=g)
    moved = states.clone()
    moved[2] = moved[2] * (1 + shift)  # the final norm's stage moves by rel RMS `shift`
    return _side("artifact", moved, logits), _side("reference", states, logits)


def test_floor_past_the_bound_is_inconclusive_under_it_fail():
    a, b = _pair(0.1)
    r = d.diff_sides(a, b, NAMES, "artifact-vs-reference", 0.0)
    assert r.verdict == "FAIL" and r.first_past == "final norm" and not r.passed
    r = d.diff_sides(a, b, NAMES, "artifact-vs-reference", 0.0, floor=[0.0, 1e-3, 0.2, 0.2])
    assert r.verdict == "INCONCLUSIVE" and not r.passed and "noise floor" in r.notes[-1]
    r = d.diff_sides(a, b, NAMES, "artifact-vs-reference", 0.0, floor=[0.0, 1e-3, 0.01, 0.01])
    assert r.verdict == "FAIL"
    a, b = _pair(0.01)  # within the bound: the floor changes nothing
    assert d.diff_sides(a, b, NAMES, "artifact-vs-reference", 0.0, floor=[1.0] * 4).verdict == "PASS"


def test_hidden_states_nudge_is_forwards(tiny_llama_dir):
    ir = api.load(str(tiny_llama_dir), max_seq_len=48)
    ids = list(range(1, 13))
    _, logits = reference.hidden_states(ir, ids, 1e-3)
    assert torch.allclose(logits, reference.forward(ir, torch.tensor([ids]), 1e-3)[0], atol=1e-5)
    _, plain = reference.hidden_states(ir, ids)
    assert (logits - plain).abs().max() > 1e-6  # the nudge moves it: the floor can be non-zero
