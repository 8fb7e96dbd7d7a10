"""User text for calibration and evaluation: read, check, tokenize.

Text is the user's own (slmc ships none). Refused with exit 2: a missing, empty,
binary or too-short file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SlmcError


def find_tokenizer_dir(model_path: str | Path | None) -> Path | None:
    """The folder holding a model's tokenizer.json: the model folder itself, or the
    folder of a .gguf file (or a sibling folder named like it)."""
    if not model_path:
        return None
    p = Path(model_path)
    for cand in (p if p.is_dir() else p.parent, p.with_suffix("")):
        if (cand / "tokenizer.json").is_file():
            return cand
    return None


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise SlmcError("no such text file", str(p))
    raw = p.read_bytes()
    if not raw.strip():
        raise SlmcError("text file is empty", str(p))
    if b"\x00" in raw[:65536]:
        raise SlmcError("looks binary (NUL bytes); expected UTF-8 text", str(p))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SlmcError(f"not UTF-8 text (byte {e.start})", str(p)) from None


def token_ids(paths: list[str | Path], tokenizer_json: Path, min_tokens: int, max_tokens: int | None = None,
              what: str = "text") -> list[int]:
    """Concatenated token ids of the files; at least min_tokens of them."""
    from tokenizers import Tokenizer

    if not Path(tokenizer_json).is_file():
        raise SlmcError(f"{what} needs the model's tokenizer.json, and there is none", str(tokenizer_json))
    tok = Tokenizer.from_file(str(tokenizer_json))
    ids: list[int] = []
    for p in paths:
        ids += tok.encode(read_text(p), add_special_tokens=False).ids
        if max_tokens and len(ids) >= max_tokens:
            break
    if len(ids) < min_tokens:
        raise SlmcError(f"{what} is too short: {len(ids)} tokens, need at least {min_tokens}",
                        ", ".join(map(str, paths)))
    return ids[:max_tokens] if max_tokens else ids
