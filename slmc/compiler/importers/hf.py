"""Import a local Hugging Face causal-LM folder (config.json + safetensors) into the IR.

Never unpickles: a folder with only `pytorch_model.bin` is refused. Never runs
remote code: models that need `trust_remote_code` are refused. Tensors load lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ...errors import SlmcError
from ..families import family_for, load_all
from ..families.base import build_model
from ..ir import Model, Weight, named_weights
from .prequant import PrequantSource, open_source

log = logging.getLogger("slmc")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SlmcError("no config.json; expected a Hugging Face model folder", str(folder))
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlmcError(f"invalid JSON ({e})", str(cfg_path)) from None
    if not isinstance(cfg, dict):
        raise SlmcError("expected a JSON object", str(cfg_path))
    # Multimodal wrappers (e.g. Gemma 3) keep the decoder in text_config.
    if isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg:
        merged = dict(cfg["text_config"])
        merged.setdefault("architectures", cfg.get("architectures"))
        if "quantization_config" in cfg:  # describes the whole checkpoint's tensors
            merged.setdefault("quantization_config", cfg["quantization_config"])
        cfg = merged
    return cfg


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SlmcError(f"invalid index ({e})", str(index)) from None
        files = sorted({folder / f for f in wm.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SlmcError(f"index lists missing shard(s) {', '.join(missing)}", str(index))
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise SlmcError(
            f"only pickle checkpoints found ({', '.join(sorted(pickles))}); slmc never unpickles "
            "untrusted files. Convert to safetensors first (e.g. with transformers' save_pretrained "
            "in a trusted environment)", str(folder))
    raise SlmcError("no *.safetensors weights found", str(folder))


def source_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """torch.isfinite(t).all() in chunks: on a whole table its temporaries (|t| and two masks)
    weigh more than the table itself (measured: +150 MiB peak on a 141 MiB checkpoint)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_finite(model: Model, strict: bool) -> None:
    """Stream every weight once; NaN/Inf warns, or fails with --strict."""
    bad = []
    for name, w in named_weights(model):
        if isinstance(w, Weight):
            was_loaded = w.loaded
            # a chunk of rows at a time where the source reads parts: a 128k-row bf16 table
            # read whole was 0.5 GB (issue 17)
            if not all(all_finite(t) for t in w.row_chunks()):
                bad.append(name)
            if not was_loaded:
                w.release()
    if bad:
        where = model.source.get("path") or "weights"
        msg = f"weights contain NaN/Inf: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
        if strict:
            raise SlmcError(f"{msg}; fix or re-export the checkpoint (without --strict this is a warning)",
                            where)
        log.warning("%s: %s", where, msg)


def check_max_seq_len(max_seq_len: int | None, limit: int, where: str) -> None:
    if max_seq_len is not None and not 1 < max_seq_len <= limit:
        raise SlmcError(f"max_seq_len {max_seq_len} is outside 2..{limit}, the model's position limit",
                        where)


def import_hf(folder: str | Path, max_seq_len: int | None = None, strict: bool = False,
              keep_codes: bool = False) -> Model:
    """keep_codes: the linears of an AutoAWQ / GPTQ checkpoint stay quantized with its own codes
    and scales (see prequant); otherwise they are dequantized to float32."""
    folder = Path(folder)
    if not folder.exists():
        raise SlmcError("no such file or folder", str(folder))
    if not folder.is_dir():
        raise SlmcError("expected a Hugging Face model folder or a .gguf file", str(folder))
    cfg = read_config(folder)
    load_all()
    family = family_for(cfg, str(folder / "config.json"))
    try:
        arch = family.normalize(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise SlmcError(f"cannot read {family.name} config: {e}", str(folder / "config.json")) from None
    check_max_seq_len(max_seq_len, arch.max_position, "--max-seq-len")
    files = weight_files(folder)
    # AutoAWQ / GPTQ checkpoints: packed linears unpacked (see prequant), the rest as usual
    src = open_source(files, cfg, str(folder / "config.json"), keep_codes)
    source = {"format": "hf", "path": str(folder.resolve()), "sha256": source_hash(files)}
    if keep_codes:
        source["keep_codes"] = True
    model = build_model(family, arch, src, max_seq_len, source)
    if isinstance(src, PrequantSource):
        src.report()
    unused = set(src.names()) - src.used - {"lm_head.weight"}
    unused = {n for n in unused if not n.endswith("rotary_emb.inv_freq")}
    if unused:
        log.warning("%d checkpoint tensors were not used, e.g. %s", len(unused), sorted(unused)[0])
    check_finite(model, strict)
    return model
