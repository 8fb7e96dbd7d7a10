"""ONNX codes (issue 17): quantize_graph finds each QuantWeight's float constant by the digest
of its dequantized image, made a block at a time (never the whole fp32 image, its transpose and
their bytes at once); the digests must be those of the whole image, else no node is found."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from slmc.compiler.quant import QuantScheme, rtn
from slmc.targets.onnx import codes


def _sha1(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 16, False), (8, 0, True), (8, 48, False)])
def test_image_digests_are_the_whole_images(bits, group, symmetric, monkeypatch):
    n, k = 40, 192
    w = rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(bits + group)),
            QuantScheme(bits, group or k, symmetric, "float32"), "rtn")
    monkeypatch.setattr(codes, "DEQUANT_CHUNK", 4 * 7 * k)  # several blocks of rows and of columns
    f = w.float().numpy()
    flat, transposed = codes.image_digests(w)
    assert (flat, transposed) == (_sha1(f), _sha1(f.T))
    w.codes[-1, -1] += 1 if w.codes[-1, -1] < 2 ** (bits - 1) - 1 else -1  # control: the last block's change shows
    w.__dict__.pop("_dequant", None)
    again = codes.image_digests(w)
    assert again[0] != flat and again[1] != transposed


def test_external_initializer_digest_reads_in_chunks(tmp_path, monkeypatch):
    """An external float initializer's digest is its file bytes', read a chunk at a time."""
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    a = np.random.default_rng(0).standard_normal((33, 17)).astype(np.float32)
    (tmp_path / "w.bin").write_bytes(b"\0" * 8 + a.tobytes())
    t = numpy_helper.from_array(a, "w")
    set_external_data(t, location="w.bin", offset=8, length=a.nbytes)
    t.ClearField("raw_data")
    g = helper.make_graph([], "g", [], [], [t])
    real = codes.read_chunks
    sizes = []
    monkeypatch.setattr(codes, "read_chunks", lambda d, e: (sizes.append(len(c)) or c for c in real(d, e, chunk=500)))
    assert codes._initializer_digests(g, str(tmp_path)) == {_sha1(a): "w"}
    assert len(sizes) > 1 and sum(sizes) == a.nbytes
    (tmp_path / "w.bin").write_bytes(b"\0" * 8 + a.tobytes()[:-4] + b"\1\2\3\4")  # control
    assert _sha1(a) not in codes._initializer_digests(g, str(tmp_path))


@pytest.mark.parametrize("a", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
                               np.array([5, -1], np.int64), np.array(16.0, np.float32), np.ones((3, 4), np.float32)[:, ::2]])
def test_initializers_made_in_the_graph_are_numpy_helpers(a):
    """_add builds the initializer inside the graph (no appended copy): the same proto bytes as
    numpy_helper.from_array's, a strided view included."""
    from onnx import helper, numpy_helper

    g = helper.make_graph([], "g", [], [])
    assert codes._add(g, "w", a) == "w"
    assert g.initializer[0].SerializeToString() == numpy_helper.from_array(a, "w").SerializeToString()
    other = a.copy()
    other.reshape(-1)[-1] += 1  # control: a changed value shows
    assert g.initializer[0].SerializeToString() != numpy_helper.from_array(other, "w").SerializeToString()
