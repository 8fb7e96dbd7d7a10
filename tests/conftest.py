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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a busy 2-core machine: a second OpenMP thread only spins."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    # Under pytest-xdist each worker gets one core: two workers with two torch threads each
    # would fight over this 2-core machine's cores.
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
