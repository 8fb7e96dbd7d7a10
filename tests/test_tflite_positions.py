"""LiteRT's decoder takes int32 positions (LoweringSpec.index_dtype): litert_torch's converter
then finds no int64 arange to rewrite, and the whole-program re-trace it runs to apply that
rewrite (one per signature) is skipped. The converted model computes the same outputs, bit for
bit, as with int64 positions. Control: with int64 positions the rewrite happens and the two
re-traces come back, so the count can fail."""

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")

from helpers import count_decompositions, run_tflite_prefill_decode  # noqa: E402
from slmc import api  # noqa: E402
from slmc.targets.tflite import target as T  # noqa: E402

P = 8


def _convert(model, monkeypatch, index_dtype=None):
    """The target's own conversion, counting whole-program decompositions and litert_torch's
    int64-to-int32 rewrites; index_dtype overrides the target's positions type."""
    import litert_torch.backend.export as be

    rewrites, rewrite, lowered = [], be._convert_i64_to_i32, T.LoweredLM
    retraces = count_decompositions(monkeypatch)
    monkeypatch.setattr(be, "_convert_i64_to_i32", lambda ep: rewrites.append(rewrite(ep)) or rewrites[-1])
    if index_dtype is not None:
        monkeypatch.setattr(T, "LoweredLM", lambda m, spec: lowered(m, dataclasses.replace(spec, index_dtype=index_dtype)))
    path, _ = T.convert(model, P, lift=False)
    monkeypatch.undo()
    return path, len(retraces), rewrites


def _run(path):
    out, res = run_tflite_prefill_decode(path, P)
    return [out[n] for n in sorted(out) if n.startswith("kv_cache")] + [res["logits"]]


def test_int32_positions_spare_a_retrace_per_signature(tiny_llama_dir, monkeypatch):
    model = api.load(str(tiny_llama_dir))
    path32, n32, rewrites32 = _convert(model, monkeypatch)
    path64, n64, rewrites64 = _convert(model, monkeypatch, index_dtype=torch.int64)
    assert rewrites32 == [False, False]  # prefill, decode: no int64 arange left to rewrite
    assert rewrites64 == [True, True]  # control: the int64 positions' aranges are rewritten
    assert n64 - n32 == 2  # and each rewrite costs a whole-program re-trace
    for a, b in zip(_run(path32), _run(path64)):
        assert np.array_equal(a, b)
