"""The KV-cache spec (kv.cache pass) lowered per target and checked against the reference,
which models the cache's dtype (an fp16 cache rounds K and V to half precision; an int8
cache rounds them to int8 codes with one scale per token and KV head).

Every legal (target, layout, dtype) runs a prompt plus greedy decode longer than the
prompt, so decode reads rows written by earlier calls; illegal combinations are refused at
compile time with the reason and exit 2.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from slmc.api import compile_model, load, validate_artifact
from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.pass_manager import PassManager, parse_pass

LEGAL = [(t, b, lay, dt) for t, b in [("executorch", "xnnpack"), ("tflite", "cpu"),
                                      ("coreml", "cpu:precision=fp32,kv=io")]
         for lay in ("bhsd", "bshd") for dt in ("float32", "float16", "int8")
         if not (t == "coreml" and lay == "bshd" and dt == "float16")  # one Core ML fp16 case is enough
         and not (t == "coreml" and dt == "int8")]  # refused (below)
# The default suite runs LiteRT's and Core ML's fp16 flow and ExecuTorch's int8 one (fp32 BHSD is
# every other test's flow; ExecuTorch's BSHD rows run in its int8 BSHD ring below); `make
# test-slow` the rest.
DEFAULT = {("tflite", "bhsd", "float16"), ("coreml", "bhsd", "float16"), ("executorch", "bhsd", "int8")}


@pytest.mark.parametrize("target,backend,layout,dtype", [
    pytest.param(*f, marks=() if (f[0], f[2], f[3]) in DEFAULT else pytest.mark.slow, id="-".join(f[::2] + f[3:]))
    for f in LEGAL])
def test_kv_spec_validates_against_reference(tiny_llama_dir, tmp_path, target, backend, layout, dtype):
    out, manifest = compile_model(tiny_llama_dir, target, backend, tmp_path / "a", max_seq_len=64,
                                  passes=[f"kv.cache:layout={layout},dtype={dtype}"])
    assert manifest["kv_cache_spec"]["layout"] == layout and manifest["kv_cache_spec"]["dtype"] == dtype
    report = validate_artifact(out, steps=40)
    assert report.passed, report.to_json()
    if dtype == "int8":  # the int8 rounding moves logits by ~5e-3 (test below); the artifact does it too
        assert max(report.prefill_max_abs, report.decode_max_abs) < 1e-4, report.to_json()
    if target == "tflite":
        k0 = next(i for i in manifest["io"]["decode"]["inputs"] if i["name"] == "kv_cache_k_0")
        assert k0["dtype"] == dtype


def test_reference_models_an_fp16_cache(tiny_llama_dir):
    ids = torch.tensor([[3, 9, 27, 81, 5, 1, 2, 7]])
    m32 = load(tiny_llama_dir, max_seq_len=64)
    m16, _ = PassManager([parse_pass("kv.cache:dtype=float16")]).run(load(tiny_llama_dir, max_seq_len=64))
    a, b = reference.forward(m32, ids), reference.forward(m16, ids)
    assert not torch.equal(a, b)  # rounding K/V is visible ...
    assert (a - b).abs().max() < 1e-2  # ... and small


def test_reference_models_an_int8_cache(tiny_llama_dir):
    ids = torch.tensor([[3, 9, 27, 81, 5, 1, 2, 7]])
    m32 = load(tiny_llama_dir, max_seq_len=64)
    m8, _ = PassManager([parse_pass("kv.cache:dtype=int8")]).run(load(tiny_llama_dir, max_seq_len=64))
    gap = (reference.forward(m32, ids) - reference.forward(m8, ids)).abs().max()
    assert 1e-3 < gap < 5e-2  # larger than the float flows' 2e-3 tolerance, so the flows above see it


def test_int8_cache_scales_are_per_token_and_head():
    x = torch.randn(1, 2, 5, 8)
    x[0, 1, 3] *= 100  # one loud token must not coarsen the others' codes
    y = reference.kv_int8_roundtrip(x)
    err = (y - x).abs() / x.abs().amax(-1, keepdim=True)
    assert err.max() <= 0.5 / 127 + 1e-6


@pytest.mark.parametrize("target,opts,words", [
    ("tflite", "arena=true", "arena"),
    ("coreml", "window=16,sink_tokens=4", "ring-buffer"),
    ("executorch", "arena=true", "arena"),
    ("executorch", "layout=bhds", "layout"),
    ("executorch", "window=8,sink_tokens=8", "sink_tokens"),
    ("coreml", "dtype=int8", "int8"),
])
def test_kv_spec_the_target_cannot_express_exits_2(tiny_llama_dir, tmp_path, target, opts, words):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-t", target, "-o", str(out),
                                  "--max-seq-len", "32", "--pass", f"kv.cache:{opts}"])
    assert r.exit_code == 2, r.output
    assert words in r.output and not out.exists()


# ---------------------------------------------------------------- ring buffer (window, sinks)

RING = [("executorch", "xnnpack", "window=16,sink_tokens=4"),
        ("executorch", "xnnpack", "window=12,layout=bshd,dtype=int8"),
        ("tflite", "cpu", "window=16,sink_tokens=4,dtype=float16"),
        ("tflite", "cpu", "window=20,layout=bshd")]


# The default suite: one ring per target (ExecuTorch's with int8 BSHD rows, LiteRT's with sinks);
# the other two with the slow suite.
@pytest.mark.parametrize("target,backend,opts", [
    pytest.param(*r, marks=pytest.mark.slow if r in (RING[0], RING[3]) else ()) for r in RING],
    ids=["-".join(r[::2]) for r in RING])
def test_ring_cache_validates_past_its_window(tiny_llama_dir, tmp_path, target, backend, opts):
    """Prompt + decode run 3-5x past the window: the ring wraps and evicts; the artifact's
    logits follow the reference's sink + recent-window attention, which differs from full
    attention by far more than the tolerance (so the ring is really exercised)."""
    out, manifest = compile_model(tiny_llama_dir, target, backend, tmp_path / "a", max_seq_len=64,
                                  passes=[f"kv.cache:{opts}"])
    ring = manifest["kv_cache"]["ring"]
    kv = manifest["kv_cache_spec"]
    assert ring["slots"] == kv["window"] and ring["sink_tokens"] == kv["sink_tokens"]
    assert ring["max_tokens_per_call"] == kv["window"] - kv["sink_tokens"]
    report = validate_artifact(out, steps=40)
    assert report.passed, report.to_json()
    assert report.prompt_tokens + report.decode_steps > 3 * kv["window"]
    if target == "tflite":  # the cache tensors hold `window` rows, not max_len
        k0 = next(i for i in manifest["io"]["decode"]["inputs"] if i["name"] == "kv_cache_k_0")
        assert kv["window"] in k0["shape"] and 64 not in k0["shape"]
    else:  # the stock runner chunks prompts by get_max_seq_len
        assert manifest["runner"]["metadata_methods"]["get_max_seq_len"] == ring["max_tokens_per_call"]


def test_tflite_prefill_longer_than_the_ring_exits_2(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-t", "tflite", "-b", "cpu:prefill_len=12",
                                  "-o", str(out), "--max-seq-len", "32", "--pass", "kv.cache:window=16,sink_tokens=8"])
    assert r.exit_code == 2, r.output
    assert "prefill length 12 exceeds the ring buffer's 8 non-sink slots" in r.output and not out.exists()


def test_reference_ring_hides_evicted_keys(tiny_llama_dir):
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    full = load(tiny_llama_dir, max_seq_len=64)
    ring, _ = PassManager([parse_pass("kv.cache:window=16,sink_tokens=4")]).run(load(tiny_llama_dir, max_seq_len=64))
    a, b = reference.forward(full, ids)[0], reference.forward(ring, ids)[0]
    assert torch.equal(a[:16], b[:16])  # nothing evicted yet
    assert (a[16:] - b[16:]).abs().amax(-1).min() > 1e-2  # every later position lost keys


def test_ring_slots_and_masks_follow_the_spec():
    from slmc.compiler.lowering.ring import ring_masks, ring_slots

    W, S = 7, 2
    slots = ring_slots(torch.arange(20), W, S)
    assert slots.tolist() == [0, 1] + [2 + (p - 2) % 5 for p in range(2, 20)]
    # a chunk at positions 13..15 sees the sinks, the ring's still-recent slots and itself causally
    pos = torch.arange(13, 16)
    mask = ring_masks(pos, W, S, [None], torch.float32)[0]
    held = {int(s): p for p in range(13) for s in [slots[p]]}  # the ring after positions 0..12
    for i, q in enumerate(pos.tolist()):
        seen = {held[j] for j in range(W) if mask[i, j] == 0} | {int(pos[t]) for t in range(3) if mask[i, W + t] == 0}
        want = {k for k in range(q + 1) if k < S or q - k < W - S}
        assert seen == want, (q, seen, want)


def test_coreml_arena_is_its_stacked_cache(tiny_llama_dir, tmp_path):
    """Core ML's keyCache/valueCache already hold every layer (one view per depth): arena=true
    compiles to that and validates; ExecuTorch and LiteRT refuse it (above)."""
    out, manifest = compile_model(tiny_llama_dir, "coreml", "all", tmp_path / "a", max_seq_len=32,
                                  passes=["kv.cache:arena=true"])
    assert manifest["kv_cache_spec"]["arena"] is True
    report = validate_artifact(out, steps=8)
    assert report.passed, report.to_json()
