"""Build tiny random Hugging Face checkpoints from each family's tiny config."""

from __future__ import annotations

from pathlib import Path

import torch


def make_hf_model(config: dict, seed: int = 0):
    import transformers

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    conf = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(conf, attn_implementation="eager")
    with torch.no_grad():  # random everywhere, norms included, so nothing is trivially 1 or 0
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def save_hf_model(config: dict, folder: Path, seed: int = 0):
    model = make_hf_model(config, seed)
    model.save_pretrained(folder)
    return model
