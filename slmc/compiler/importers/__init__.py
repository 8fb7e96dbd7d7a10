"""Model importers: a Hugging Face folder or a GGUF file, both into the IR."""

from __future__ import annotations

from pathlib import Path

from ...errors import SlmcError
from ..ir import Model


def load_model(path: str | Path, max_seq_len: int | None = None, strict: bool = False,
               keep_codes: bool = False) -> Model:
    """Import `path`: a folder is a Hugging Face model, a `.gguf` file (or any file starting
    with the GGUF magic) is llama.cpp's format. keep_codes: a pre-quantized checkpoint
    (GGUF Q4_0/Q4_1/Q8_0, AutoAWQ, GPTQ) keeps its integer codes instead of being
    dequantized to float."""
    p = Path(path)
    if not p.exists():
        raise SlmcError("no such file or folder", str(p))
    if p.is_dir():
        from .hf import import_hf

        return import_hf(p, max_seq_len=max_seq_len, strict=strict, keep_codes=keep_codes)
    from .gguf import GGUF_MAGIC, import_gguf

    if p.suffix.lower() == ".gguf" or _starts_with(p, GGUF_MAGIC):
        return import_gguf(p, max_seq_len=max_seq_len, strict=strict, keep_codes=keep_codes)
    hint = " (pass the folder that holds it)" if p.suffix in (".json", ".safetensors") else ""
    raise SlmcError(f"expected a Hugging Face model folder or a .gguf file{hint}", str(p))


def _starts_with(p: Path, magic: bytes) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


__all__ = ["load_model"]
