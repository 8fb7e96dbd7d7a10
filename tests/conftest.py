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


TINY_ET_RECIPE = "int8da-int4w-g32-rtn"  # XNNPACK 8da4w, round to nearest: no calibration
TINY_ET_MAX_LEN = 32


@pytest.fixture(scope="session")
def tiny_et_8da4w(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama through ExecuTorch/XNNPACK with TINY_ET_RECIPE: one compile (about a minute,
    nearly all of it ExecuTorch's to_edge) per test worker, shared by the modules that check such
    an artifact. A callable: copy_to(dest) puts a private copy of the folder at dest and returns
    (dest, manifest read from the copy), so a test that records into or edits its copy cannot reach
    another's; copy_to.returned is the manifest compile returned."""
    import json
    import shutil

    from slmc import api

    pristine, returned = api.compile_model(str(tiny_llama_dir), "executorch", "xnnpack",
                                           tmp_path_factory.mktemp("tiny-et-8da4w") / "a",
                                           max_seq_len=TINY_ET_MAX_LEN, recipe=TINY_ET_RECIPE)

    def copy_to(dest):
        shutil.copytree(pristine, dest)
        return dest, json.loads((dest / "manifest.json").read_text())

    copy_to.returned = returned
    return copy_to


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
