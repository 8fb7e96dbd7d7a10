"""Every RoPE type (issue 14, item 3): parity with transformers for the types the families
load (default, linear, llama3), and a clear refusal for the ones they do not (dynamic, yarn,
longrope), at load time and in the reference executor."""

from __future__ import annotations

import pytest
import torch

from slmc.compiler import reference
from slmc.compiler.families import FAMILIES, load_all
from slmc.compiler.families.base import rope_of
from slmc.compiler.ir import RoPE
from slmc.errors import UnsupportedError

load_all()

REFUSED = {
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                 "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("theta,scaling", [(10000.0, None), (500000.0, None)])
def test_default_rope_matches_transformers(theta, scaling):
    """linear and llama3 are checked in test_lowering_math.py; this is the unscaled default."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim = 32
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=4, head_dim=head_dim,
                      rope_theta=theta, max_position_embeddings=4096)
    hf = LlamaRotaryEmbedding(cfg)
    rope = RoPE(theta=theta, dim=head_dim, scaling=scaling)
    torch.testing.assert_close(reference.rope_inv_freq(rope), hf.inv_freq.float(), rtol=1e-6, atol=0)
    positions = torch.tensor([0, 1, 5, 47, 300, 4000])
    cos, sin = hf(torch.zeros(1, len(positions), head_dim), positions[None])
    rc, rs = reference.rope_cos_sin(rope, positions)
    torch.testing.assert_close(rc, cos[0], atol=5e-4, rtol=0)
    torch.testing.assert_close(rs, sin[0], atol=5e-4, rtol=0)


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_unsupported_rope_types_are_refused_at_load(kind):
    cfg = {"rope_theta": 10000.0, "rope_scaling": dict(REFUSED[kind])}
    with pytest.raises(UnsupportedError, match=f"rope scaling '{kind}' is not supported"):
        rope_of(cfg)
    new_style = {"rope_parameters": {"rope_theta": 10000.0, **REFUSED[kind]}}
    with pytest.raises(UnsupportedError, match=kind):
        rope_of(new_style)


@pytest.mark.parametrize("kind", sorted(REFUSED))
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_families_refuse_unsupported_rope_types(family, kind):
    if family not in FAMILIES:
        pytest.skip(f"no {family} family")
    cfg = {**FAMILIES[family].tiny_config(), "rope_scaling": dict(REFUSED[kind])}
    cfg.pop("rope_parameters", None)
    with pytest.raises(UnsupportedError, match=kind):
        FAMILIES[family].normalize(cfg)


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_reference_refuses_unsupported_rope_types(kind):
    with pytest.raises(ValueError, match=f"rope type '{kind}' has no reference implementation"):
        reference.rope_inv_freq(RoPE(theta=10000.0, dim=16, scaling=dict(REFUSED[kind])))
