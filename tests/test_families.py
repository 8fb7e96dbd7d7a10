"""Every registered family: a tiny random HF checkpoint imports, verifies, and the reference
executor's logits match transformers' (eager attention, fp32) on a sequence longer than the
tiny sliding windows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_hf_model, save_hf_model  # noqa: E402

from slmc.compiler import reference  # noqa: E402
from slmc.compiler.families import FAMILIES, family_for, load_all  # noqa: E402
from slmc.compiler.importers.hf import import_hf  # noqa: E402
from slmc.compiler.ir import MoE  # noqa: E402
from slmc.compiler.verify import verify  # noqa: E402
from slmc.errors import UnsupportedError  # noqa: E402

load_all()
NAMES = sorted(FAMILIES)
MOE = [n for n in NAMES if FAMILIES[n].tiny_config().get("num_experts", 0)
       or FAMILIES[n].tiny_config().get("num_local_experts", 0)]
SEQ = 24
TOL = 1e-4


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, SEQ), generator=g)


def _check_parity(hf, model, cfg) -> None:
    verify(model, f"{model.family} import")
    ids = _ids(cfg["vocab_size"])
    with torch.no_grad():
        want = hf(input_ids=ids).logits.float()
    got = reference.forward(model, ids)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{model.family}: max |logits diff| {err:.3g} > {TOL}"
    assert want.abs().max().item() > 0.1, "logits too small for the comparison to mean anything"


@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_transformers(name, tmp_path):
    cfg = FAMILIES[name].tiny_config()
    hf = save_hf_model(cfg, tmp_path)
    model = import_hf(tmp_path)
    assert model.family == name
    assert model.architecture == cfg["architectures"][0]
    _check_parity(hf, model, cfg)
    windows = [model.block_at(d).attn.sliding_window for d in range(model.n_layers)]
    if cfg.get("sliding_window"):
        assert any(w is not None and w < SEQ for w in windows), "the tiny window must be exercised"


@pytest.mark.parametrize("name", MOE)
def test_moe_fused_expert_layout(name, tmp_path):
    """transformers 5's in-memory layout (3-D gate_up_proj/down_proj) imports the same."""
    cfg = FAMILIES[name].tiny_config()
    hf = make_hf_model(cfg)
    hf.save_pretrained(tmp_path, save_original_format=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    model = import_hf(tmp_path)
    experts = model.blocks[0].ffn.experts
    assert not any(e.gate_up.weight.loaded for e in experts), "per-expert slices must load lazily"
    _check_parity(hf, model, cfg)


@pytest.mark.parametrize("name", MOE)
def test_moe_routes_to_several_experts(name, tmp_path):
    cfg = FAMILIES[name].tiny_config()
    hf = make_hf_model(cfg)
    with torch.no_grad():
        out = hf(input_ids=_ids(cfg["vocab_size"]), output_router_logits=True)
    n_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    top_k = cfg["num_experts_per_tok"]
    for layer_logits in out.router_logits:
        hit = layer_logits.topk(top_k, dim=-1).indices.unique().numel()
        assert hit >= min(3, n_experts), f"only {hit} of {n_experts} experts were hit"
    hf.save_pretrained(tmp_path)
    model = import_hf(tmp_path)
    sparse = [isinstance(model.block_at(d).ffn, MoE) for d in range(model.n_layers)]
    assert sum(sparse) == len(out.router_logits)


@pytest.mark.parametrize("name", NAMES)
def test_old_configs_without_layer_types(name, tmp_path):
    """Configs written before `layer_types` existed get the same per-layer windows from the
    family's older rule (checked against transformers' own expansion)."""
    cfg = FAMILIES[name].tiny_config()
    if "layer_types" in cfg:
        pytest.skip("tiny config sets layer_types explicitly")
    make_hf_model(cfg).config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    fam = FAMILIES[name]
    want = fam.normalize(saved).sliding_window
    saved.pop("layer_types", None)
    assert fam.normalize(saved).sliding_window == want


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedError) as e:
        family_for({"architectures": ["FancyNewForCausalLM"]}, "config.json")
    msg = str(e.value)
    assert "FancyNewForCausalLM" in msg
    for fam in FAMILIES.values():
        for arch in fam.architectures:
            assert arch in msg


def test_unsupported_architecture_from_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FancyNewForCausalLM"]}))
    with pytest.raises(UnsupportedError, match="Qwen2ForCausalLM"):
        import_hf(tmp_path)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
def test_config_without_architectures_loads_by_model_type(name, tmp_path):
    """transformers loads a folder whose config.json has model_type but no architectures; so does slmc."""
    cfg = FAMILIES[name].tiny_config()
    hf = save_hf_model(cfg, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    del conf["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    model = import_hf(tmp_path)
    assert model.family == name
    _check_parity(hf, model, cfg)


def test_unknown_model_type_without_architectures_is_refused():
    with pytest.raises(UnsupportedError, match="none given; model_type 'fancy'"):
        family_for({"model_type": "fancy"}, "config.json")


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
    {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                         "long_factor": [2.0] * 8, "original_max_position_embeddings": 4096}},
])
def test_phi3_longrope_refused(rope):
    cfg = {**FAMILIES["phi3"].tiny_config(), **rope}
    cfg.pop("rope_parameters") if "rope_scaling" in rope else None
    with pytest.raises(UnsupportedError, match="longrope|su"):
        FAMILIES["phi3"].normalize(cfg)


def test_gemma3_old_style_config(tmp_path):
    """Pre-transformers-5 Gemma 3 keys (rope_theta + rope_local_base_freq + rope_scaling,
    sliding_window_pattern) normalise like transformers' own expansion of them."""
    import transformers

    old = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 256,
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 5, "num_attention_heads": 4,
           "num_key_value_heads": 1, "head_dim": 16, "rope_theta": 500000.0, "rope_local_base_freq": 20000.0,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 8,
           "sliding_window_pattern": 2}
    kw = {k: v for k, v in old.items() if k not in ("architectures", "model_type")}
    transformers.AutoConfig.for_model("gemma3_text", **kw).save_pretrained(tmp_path)
    new = json.loads((tmp_path / "config.json").read_text())
    a, b = FAMILIES["gemma3"].normalize(old), FAMILIES["gemma3"].normalize(new)
    assert a.sliding_window == b.sliding_window == [8, None, 8, None, 8]
    assert a.rope_theta_per_layer == b.rope_theta_per_layer == [20000.0, 500000.0] * 2 + [20000.0]
    assert a.rope_scaling_per_layer == b.rope_scaling_per_layer
    assert a.rope_scaling_per_layer[1] == {"rope_type": "linear", "factor": 8.0}
    assert a.tie_embeddings and a.embed_scale == 8.0 and a.attn_scale == 256 ** -0.5
