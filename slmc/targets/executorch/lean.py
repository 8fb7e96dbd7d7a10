"""Lowering to ExecuTorch without the weight copies its Python pipeline makes by default.

Measured on a 49.6M-parameter SmolLM2-shaped model (bench/results/memory.md), ExecuTorch 1.5.1's
`to_edge_transform_and_lower` + `to_executorch` hold, beside the torch weights:
- a clone of every constant two partitions read (`_maybe_duplicate_constant_nodes`: the tied
  embedding/head table, read by the portable embedding op and the delegated head);
- a deep copy of every delegated partition, weights included, all made before the first
  backend preprocess (`BackendDetails.copy_exported_program_for_preprocess`);
- XNNPACK's `bytes` copy of every weight it packs, kept in the NamedDataStore until the file
  is serialized, and the emitter's `bytes` copy of every constant kept outside the delegate.
`lean_lowering()` removes the first two (the copies share the weights' storage: nothing
writes a weight in place) and spills the last two to files in a scratch folder as soon as
they are made (ExecuTorch's `FileBackedData`, which its serializers stream from), so RAM
holds one packed weight at a time instead of all of them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..base import page_out_weights, scratch_file

SPILL_MIN_BYTES = 1 << 20  # smaller blobs stay in RAM (one file per blob is not worth it)


class _ShareTensors:
    """Stands in for the `copy` module where ExecuTorch duplicates a constant: a tensor's
    copy is an alias of it (Parameter stays Parameter); anything else is deep-copied."""

    @staticmethod
    def deepcopy(x, memo=None):
        if isinstance(x, torch.nn.Parameter):
            return torch.nn.Parameter(x.data, requires_grad=x.requires_grad)
        if isinstance(x, torch.Tensor):
            return x.detach()
        return copy.deepcopy(x, memo)

    copy = staticmethod(copy.copy)


def _copy_sharing_weights(cls, edge_program, compile_specs):
    """The partition program is deep-copied (its graph may be rewritten by the backend's
    passes) but its weights are not: they are read, never written, by preprocess."""
    memo = {}
    for t in list(edge_program.state_dict.values()) + list(edge_program.constants.values()):
        if isinstance(t, torch.Tensor):
            memo[id(t)] = t
    return copy.deepcopy(edge_program, memo)


class Spill:
    """Blobs written to files in one scratch folder, as ExecuTorch FileBackedData."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="slmc-et-spill-")  # TMPDIR picks the disk
        self.n = 0

    def __call__(self, data):
        """bytes of SPILL_MIN_BYTES or more -> FileBackedData (deleted when dropped); else as is."""
        from executorch.exir._serialize._cord import FileBackedData

        if not isinstance(data, (bytes, bytearray)) or len(data) < SPILL_MIN_BYTES:
            return data
        path = os.path.join(self.dir, f"{self.n}.bin")
        self.n += 1
        with open(path, "wb") as f:
            f.write(data)
        # the checkpoint pages read to make this blob are let go as well, so the mapped
        # checkpoint is not resident whole beside the copies made from it (base.page_out_weights)
        page_out_weights()
        return FileBackedData(path, cleanup=True, sha256=hashlib.sha256(data).digest())

    def join(self, cord, name: str) -> Path:
        """A Cord (its spilled parts on disk) written once, as the artifact file `name` in the
        scratch folder (base.scratch_file): never joined into one bytes object in RAM."""
        path = scratch_file(name)
        with open(path, "wb") as f:
            cord.write_to_file(f)
        return path

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def blob_sha256(buf) -> bytes:
    """sha256 of a bytes or FileBackedData blob (a FileBackedData knows its own)."""
    if isinstance(buf, (bytes, bytearray, memoryview)):
        return hashlib.sha256(buf).digest()
    return buf.sha256()


@contextlib.contextmanager
def lean_lowering(backend: str):
    """While ExecuTorch lowers and serializes: shared constant copies, and packed/emitted
    weights spilled to a scratch folder (removed on exit). Yields the Spill (the emitter's
    constants are spilled by the caller's serializer hook, see program.py)."""
    import executorch.backends.xnnpack.xnnpack_preprocess as xnn
    import executorch.exir.backend.canonical_partitioners.duplicate_constant_node_pass as dup
    from executorch.exir._serialize._named_data_store import NamedDataStore

    spill = Spill()
    orig_add, orig_copy = NamedDataStore.add_named_data, dup.copy

    def add_named_data(self, key, data, *args, **kwargs):
        return orig_add(self, key, spill(data), *args, **kwargs)

    patched = []
    if backend == "xnnpack":  # its preprocess only reads the weights (checked by the tests' outputs)
        patched.append((xnn.XnnpackBackend, xnn.XnnpackBackend.__dict__.get("copy_exported_program_for_preprocess")))
        xnn.XnnpackBackend.copy_exported_program_for_preprocess = classmethod(_copy_sharing_weights)
    NamedDataStore.add_named_data = add_named_data
    dup.copy = _ShareTensors
    try:
        yield spill
    finally:
        NamedDataStore.add_named_data, dup.copy = orig_add, orig_copy
        for cls, orig in patched:
            if orig is None:
                del cls.copy_exported_program_for_preprocess
            else:
                cls.copy_exported_program_for_preprocess = orig
        spill.close()
