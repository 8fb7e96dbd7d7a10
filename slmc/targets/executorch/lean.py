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

Beside the weights: XNNPACK's partitioner (GroupBasedPartitioner) builds every node's
transitive downstream and upstream sets as Python sets, O(nodes^2) entries: 310 MiB at
once on SmolLM2-135M's 30 layers, the compile's peak (bench/results/memory.md). It only
ever asks for downstreams; `_BitsetDependencyViewer` keeps them as one integer bitmask per
node (nodes^2 / 8 bytes: 3 MB there) and answers with the same nodes.

And where XNNPACK's serializer and the emitter copy a weight's memory into `bytes` (to hash
it, then to store it), `Spill.bytes_of` stands in for `bytes`: a big weight is written to a
scratch file, a chunk at a time, and handed on as a read-only mapping of it, so the copy never
sits in RAM beside the weight (2 x 113 MiB at once for SmolLM2-135M's tied table). Their
`hashlib.sha256` of such a mapping answers with the digest taken while writing, so hashing
does not read the file back into RAM either.

The partitioner is given the edge program itself, not ExecuTorch's fake copy of its graph
(`_partition_in_place`), and torch's CapabilityBasedPartitioner, which GroupBasedPartitioner
builds first, gets the bitset viewer too.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import ctypes
import hashlib
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ...compiler.spill import register_spill_file, trimming
from ..base import page_out_weights, scratch_file
from .fused_passes import fused_edge_passes
from .idle_passes import idle_decomposition_skipped, idle_retraces_skipped
from .packing import chunked_packing

SPILL_MIN_BYTES = 1 << 20  # smaller blobs stay in RAM (one file per blob is not worth it)
CHUNK_BYTES = 16 << 20  # bytes_of reads a weight this much at a time


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


def _partition_in_place(edge_program):
    """Stands in for ExecuTorch's get_fake_program, which gives the partitioner a deep copy
    of the edge graph (every node and its metadata) with fake weights, so the program it
    was given stays untagged. Nothing reads that program afterwards (to_backend replaces
    it with the tagged one), so the partitioner tags it in place: no second graph."""
    return edge_program


class _NodeBits:
    """The nodes whose bits are set in `mask` (indices into `nodes`): iterable, like a set."""

    __slots__ = ("mask", "nodes", "index")

    def __init__(self, mask: int, nodes: list, index: dict):
        self.mask, self.nodes, self.index = mask, nodes, index

    def __contains__(self, node) -> bool:
        i = self.index.get(node)
        return i is not None and bool(self.mask >> i & 1)

    def __len__(self) -> int:
        return self.mask.bit_count()

    def __iter__(self):
        import numpy as np

        if not self.mask:
            return iter(())
        raw = np.frombuffer(self.mask.to_bytes((self.mask.bit_length() + 7) // 8, "little"), np.uint8)
        return (self.nodes[i] for i in np.flatnonzero(np.unpackbits(raw, bitorder="little")))


class _BitsetDependencyViewer:
    """ExecuTorch's group_partitioner._DependencyViewer (same answers) with each node's
    transitive downstream set as an int bitmask; upstream sets, unused there, are made only
    if asked for."""

    def __init__(self, graph_module):
        self.nodes = list(graph_module.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.down = self._closure(reversed(range(len(self.nodes))), lambda n: n.users)
        self.up = None

    def _closure(self, order, edges) -> list[int]:
        """Each node's transitive set along `edges`, visiting nodes in `order` (as
        ExecuTorch's viewer does, so a node's neighbours are done before it)."""
        sets = [0] * len(self.nodes)
        for i in order:
            m = 0
            for other in edges(self.nodes[i]):
                j = self.index[other]
                m |= (1 << j) | sets[j]
            sets[i] = m
        return sets

    def downstreams_of(self, node) -> _NodeBits:
        i = self.index.get(node)
        return _NodeBits(self.down[i] if i is not None else 0, self.nodes, self.index)

    def mask_of(self, nodes) -> int:
        """The bitmask of `nodes` (those the viewer was built with; no set holds the others)."""
        m = 0
        for n in nodes:
            i = self.index.get(n)
            if i is not None:
                m |= 1 << i
        return m

    def reaches(self, node, mask: int) -> bool:
        """Whether a node downstream of `node` is in `mask`."""
        i = self.index.get(node)
        return i is not None and bool(self.down[i] & mask)

    def upstreams_of(self, node) -> _NodeBits:
        if self.up is None:
            self.up = self._closure(range(len(self.nodes)), lambda n: n.all_input_nodes)
        i = self.index.get(node)
        return _NodeBits(self.up[i] if i is not None else 0, self.nodes, self.index)


def _can_merge_partitions(self, p1, p2, partitions_by_id):
    """GroupBasedPartitioner._can_merge_partitions, same answers: merging would make a cycle
    when an outside user of either partition reaches back into them. ExecuTorch walks each
    such user's whole downstream set (145 M membership tests for SmolLM2-135M, 80 s of a
    profiled compile); with the bitset viewer it is one AND per user."""
    from torch.fx.passes.utils.fuser_utils import validate_partition

    viewer = self.dependency_viewer
    if not isinstance(viewer, _BitsetDependencyViewer):
        return _ORIGINAL_CAN_MERGE[0](self, p1, p2, partitions_by_id)
    combined = set(partitions_by_id[p1].nodes.keys()) | set(partitions_by_id[p2].nodes.keys())
    mask = viewer.mask_of(combined)
    for node in combined:
        for user in node.users:
            if user not in combined and viewer.reaches(user, mask):
                return False
    return validate_partition(list(combined))


_ORIGINAL_CAN_MERGE = [None]  # GroupBasedPartitioner's own, while lean_lowering replaces it


class Spill:
    """Blobs written to files in one scratch folder, as ExecuTorch FileBackedData."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="slmc-et-spill-")  # TMPDIR picks the disk
        self.n = 0
        self.mapped = {}  # id(view) -> (view, its file, its sha256): what bytes_of handed out
        self._last = None  # (ctypes array, its file, its sha256): bytes_of's last new file

    def _new_path(self) -> str:
        path = os.path.join(self.dir, f"{self.n}.bin")
        self.n += 1
        return path

    def _write(self, data) -> str:
        path = self._new_path()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def __call__(self, data):
        """bytes of SPILL_MIN_BYTES or more, or a view bytes_of made -> FileBackedData; else
        as is."""
        from executorch.exir._serialize._cord import FileBackedData

        own = self.mapped.get(id(data)) if isinstance(data, memoryview) else None
        if own is not None and own[0] is data:  # already in a file: no second copy
            return FileBackedData(own[1], cleanup=False, sha256=own[2])
        if not isinstance(data, (bytes, bytearray)) or len(data) < SPILL_MIN_BYTES:
            return data
        path = self._write(data)
        # the checkpoint pages read to make this blob are let go as well, so the mapped
        # checkpoint is not resident whole beside the copies made from it (base.page_out_weights)
        page_out_weights()
        return FileBackedData(path, cleanup=True, sha256=hashlib.sha256(data).digest())

    def bytes_of(self, x=b"", *rest):
        """`bytes`, except for a big ctypes array (a tensor's memory): written to a file and
        returned as a read-only mapping of it (bytes-like, file pages that page_out_weights
        lets go of). XNNPACK asks twice for each weight (to hash it, then to store it): the
        second time maps the same file again rather than reading the weight again."""
        if rest or not isinstance(x, ctypes.Array) or ctypes.sizeof(x) < SPILL_MIN_BYTES:
            return builtins.bytes(x, *rest)
        page_out_weights()  # the caller hashed the last view: its pages are resident
        if self._last is not None and self._last[0] is x:
            path, digest = self._last[1:]
        else:
            path, digest = self._write_paged(memoryview(x).cast("B"))
            self._last = (x, path, digest)
        with open(path, "rb") as f:
            register_spill_file(f.fileno())
            view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        self.mapped[id(view)] = (view, path, digest)
        return view

    def _write_paged(self, raw: memoryview) -> tuple[str, bytes]:
        """raw written to a new file in chunks, its sha256 computed on the way; the weight's
        file pages read for each chunk are let go before the next (page_out_weights), so a
        big table is never resident whole beside its copy."""
        path = self._new_path()
        h = hashlib.sha256()
        with open(path, "wb") as f:
            for i in range(0, len(raw), CHUNK_BYTES):
                part = raw[i:i + CHUNK_BYTES]
                f.write(part)
                h.update(part)
                page_out_weights()
        return path, h.digest()

    def sha256(self, data=b"", **kw):
        """hashlib.sha256, except for a view bytes_of made: the digest computed while writing
        it, so hashing does not bring its file pages into RAM."""
        own = self.mapped.get(id(data)) if isinstance(data, memoryview) else None
        if own is not None and own[0] is data:
            return _Digest(own[2])
        return hashlib.sha256(data, **kw)

    def join(self, cord, name: str) -> Path:
        """A Cord (its spilled parts on disk) written once, as the artifact file `name` in the
        scratch folder (base.scratch_file): never joined into one bytes object in RAM."""
        path = scratch_file(name)
        with open(path, "wb") as f:
            cord.write_to_file(f)
        return path

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class _Digest:
    """A finished sha256, as hashlib's object answers for it."""

    def __init__(self, digest: bytes):
        self._d = digest

    def digest(self) -> bytes:
        return self._d

    def hexdigest(self) -> str:
        return self._d.hex()


class _Hashlib:
    """The `hashlib` module to ExecuTorch's serializers, its sha256 answered by Spill.sha256."""

    def __init__(self, spill: Spill):
        self.sha256 = spill.sha256

    def __getattr__(self, name):
        return getattr(hashlib, name)


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
    import executorch.backends.xnnpack.operators.node_visitor as xnn_visitor
    import executorch.backends.xnnpack.xnnpack_preprocess as xnn
    import executorch.exir.backend.backend_api as backend_api
    import executorch.exir.backend.canonical_partitioners.duplicate_constant_node_pass as dup
    import executorch.exir.emit._emitter as emitter
    import executorch.exir.backend.canonical_partitioners.group_partitioner as group
    import torch.fx.passes.infra.partitioner as fx_partitioner
    from executorch.exir._serialize._named_data_store import NamedDataStore

    spill = Spill()
    orig_add, orig_copy = NamedDataStore.add_named_data, dup.copy

    def add_named_data(self, key, data, *args, **kwargs):
        return orig_add(self, key, spill(data), *args, **kwargs)

    patched = []
    if backend == "xnnpack":  # its preprocess only reads the weights (checked by the tests' outputs)
        patched.append((xnn.XnnpackBackend, xnn.XnnpackBackend.__dict__.get("copy_exported_program_for_preprocess")))
        xnn.XnnpackBackend.copy_exported_program_for_preprocess = classmethod(_copy_sharing_weights)
    # GroupBasedPartitioner builds torch's CapabilityBasedPartitioner's viewer, then its own
    viewers = [(m, m._DependencyViewer) for m in (group, fx_partitioner)]
    orig_fake = backend_api.get_fake_program
    backend_api.get_fake_program = _partition_in_place
    NamedDataStore.add_named_data = add_named_data
    dup.copy = _ShareTensors
    for m, _ in viewers:
        m._DependencyViewer = _BitsetDependencyViewer
    _ORIGINAL_CAN_MERGE[0] = group.GroupBasedPartitioner._can_merge_partitions
    group.GroupBasedPartitioner._can_merge_partitions = _can_merge_partitions
    for mod in (xnn_visitor, emitter):  # their only uses of bytes() copy a tensor's memory
        mod.bytes, mod.hashlib = spill.bytes_of, _Hashlib(spill)
    skip = idle_retraces_skipped() if backend == "xnnpack" else contextlib.nullcontext()
    try:
        with trimming(), skip, idle_decomposition_skipped(), fused_edge_passes(), chunked_packing():
            yield spill
    finally:
        NamedDataStore.add_named_data, dup.copy = orig_add, orig_copy
        backend_api.get_fake_program = orig_fake
        for m, viewer in viewers:
            m._DependencyViewer = viewer
        group.GroupBasedPartitioner._can_merge_partitions = _ORIGINAL_CAN_MERGE[0]
        for mod in (xnn_visitor, emitter):
            del mod.bytes
            mod.hashlib = hashlib
        for cls, orig in patched:
            if orig is None:
                del cls.copy_exported_program_for_preprocess
            else:
                cls.copy_exported_program_for_preprocess = orig
        spill.close()
