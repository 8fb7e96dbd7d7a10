import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint with a byte-level tokenizer (built once per session)."""
    from tiny import save_hf_model, save_ascii_tokenizer

    from slmc.compiler.families.llama import tiny_config

    d = tmp_path_factory.mktemp("tiny-llama")
    save_hf_model(tiny_config(), d)
    save_ascii_tokenizer(d)
    return d
