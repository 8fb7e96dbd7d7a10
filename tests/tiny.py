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


def save_ascii_tokenizer(folder: Path, vocab_size: int = 256) -> None:
    """A tokenizer.json for tiny models: every token is printable ASCII (single
    characters, then two-character strings), so any generated id decodes to valid
    UTF-8 and the stock ExecuTorch runner can stream it."""
    import itertools
    import string

    from tokenizers import Tokenizer, models

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    pairs = ("".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2))
    tokens = list(itertools.islice(itertools.chain(chars, pairs), vocab_size))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.save(str(Path(folder) / "tokenizer.json"))
