"""The lowering's own numerics (lowering/math.py) against the reference executor's, formula by
formula: both are written independently, so a mismatch names the side that is wrong. And the
reference's Llama 3 RoPE scaling against transformers' own."""

import pytest
import torch

from slmc.compiler import reference
from slmc.compiler.ir import RoPE
from slmc.compiler.lowering import math as lm

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SCALINGS = {"default": None, "linear": {"rope_type": "linear", "factor": 4.0}, "llama3": LLAMA3}


@pytest.mark.parametrize("kind", sorted(SCALINGS))
@pytest.mark.parametrize("dim,head_dim", [(32, 32), (16, 32)])  # full and partial rotary
def test_rope_tables_equal_the_reference(kind, dim, head_dim):
    rope = RoPE(theta=10000.0, dim=dim, scaling=SCALINGS[kind])
    assert torch.equal(lm.rope_frequencies(rope), reference.rope_inv_freq(rope))
    cos, sin = lm.rope_tables(rope, 300, head_dim)
    rc, rs = reference.rope_cos_sin(rope, torch.arange(300))
    assert torch.equal(cos[:, :dim], rc) and torch.equal(sin[:, :dim], rs)
    # the tail past the rotary dims is the identity: cos 1, sin 0
    assert bool((cos[:, dim:] == 1).all()) and bool((sin[:, dim:] == 0).all())


def test_llama3_scaling_covers_all_three_bands():
    """The test above only means something if the scaled frequencies differ from the plain ones
    in every band (divided, blended, kept)."""
    plain = lm.rope_frequencies(RoPE(10000.0, 32))
    scaled = lm.rope_frequencies(RoPE(10000.0, 32, LLAMA3))
    ratio = plain / scaled
    assert ratio[0] == 1.0 and torch.isclose(ratio[-1], torch.tensor(8.0))
    assert bool(((ratio > 1.0 + 1e-6) & (ratio < 8.0 - 1e-6)).any())


@pytest.mark.parametrize("dim", [16, 32])
def test_rotation_matches_the_reference(dim):
    rope = RoPE(theta=10000.0, dim=dim, scaling=LLAMA3)
    cos, sin = lm.rope_tables(rope, 20, 32)
    x = torch.randn(1, 4, 20, 32, generator=torch.Generator().manual_seed(0))
    R = lm.rotate_half_matrix(32, dim, torch.float32)
    rc, rs = reference.rope_cos_sin(rope, torch.arange(20))
    want = reference.apply_rope(x, rc, rs)
    torch.testing.assert_close(x * cos + (x @ R) * sin, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["silu", "gelu_tanh", "gelu"])
def test_activations_equal_the_reference(name):
    x = torch.linspace(-12, 12, 4001)
    assert torch.equal(lm.activation(name, x), reference.activation(name, x))
    # Core ML's spelled-out tanh GELU: the same function up to float rounding
    torch.testing.assert_close(lm.activation_spelled(name, x), reference.activation(name, x), atol=2e-6, rtol=1e-5)


def test_int8_kv_codes_and_scales_equal_the_reference():
    x = torch.randn(1, 2, 9, 16, generator=torch.Generator().manual_seed(1)) * 3
    x[0, 0, 0] = 0.0  # an all-zero row: the scale's floor
    s = lm.int8_kv_scale(x)
    assert torch.equal(s, reference.kv_int8_scale(x))
    codes = lm.int8_kv_codes(x, s)
    assert torch.equal(codes, reference.kv_int8_codes(x, s))
    assert torch.equal(codes * s, reference.kv_int8_roundtrip(x))
    assert int(codes.abs().max()) == 127


@pytest.mark.parametrize("window,sinks", [(8, 0), (8, 2), (5, 4)])
def test_ring_visibility_equals_the_reference(window, sinks):
    q, k = torch.arange(40)[:, None], torch.arange(40)[None, :]
    got = lm.ring_visible(q, k, window, sinks)
    assert torch.equal(got, reference.ring_keep(q, k, window, sinks))
    assert bool(got.any()) and not bool(got.all())


def test_softcap_is_a_smooth_clamp():
    """Gemma's soft-cap: odd, about the identity well inside the cap, never past it."""
    x = torch.linspace(-200, 200, 801)
    capped = lm.softcap(x, 30.0)
    assert bool((capped.abs() < 30.0 + 1e-4).all()) and float(capped.max()) > 29.9
    assert torch.equal(capped, -lm.softcap(-x, 30.0))
    small = torch.linspace(-0.3, 0.3, 61)
    torch.testing.assert_close(lm.softcap(small, 30.0), small, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 4.0},
])
def test_reference_rope_scaling_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    theta, head_dim = 500000.0, 64
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=4, head_dim=head_dim,
                      rope_theta=theta, rope_scaling=dict(scaling), max_position_embeddings=131072)
    hf = LlamaRotaryEmbedding(cfg)
    assert hf.attention_scaling == 1.0
    rope = RoPE(theta=theta, dim=head_dim, scaling=dict(scaling))
    torch.testing.assert_close(reference.rope_inv_freq(rope), hf.inv_freq.float(), rtol=1e-6, atol=0)
    positions = torch.tensor([0, 1, 7, 100, 4000, 20000])
    cos, sin = hf(torch.zeros(1, len(positions), head_dim), positions[None])
    rc, rs = reference.rope_cos_sin(rope, positions)
    # angles up to 2e4 rad: float32 rounding of the frequencies moves them by ~1e-3 there
    torch.testing.assert_close(rc, cos[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(rs, sin[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(rc[:4], cos[0, :4], atol=1e-5, rtol=0)
