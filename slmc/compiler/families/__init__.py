"""Architecture families, one module each, registered by HF `architectures` string."""

import importlib

from .base import FAMILIES, ArchConfig, Family, family_for, register, supported_architectures

_MODULES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "mixtral", "qwen2_moe")


def load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:  # a family still being written must not break the others
            if e.name != f"{__name__}.{m}":
                raise


__all__ = ["FAMILIES", "ArchConfig", "Family", "family_for", "register", "supported_architectures", "load_all"]
