"""ExecuTorch's int4 packers, block by block (issue 17: their whole-table temporaries set the
1B compile's lowering peaks): the same bytes as ExecuTorch's own, and used while lowering."""

import pytest
import torch

pytest.importorskip("executorch")

from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor  # noqa: E402
from executorch.exir.passes import _quant_patterns_and_replacements as qpr  # noqa: E402

from slmc.targets.executorch import packing  # noqa: E402


def _codes(rows, cols, seed=0):
    return torch.randint(-8, 8, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("shape", [(7, 64), (3000, 2048), (2 ** 22 // 96 + 3, 96)])
def test_the_packers_give_executorchs_bytes(shape, monkeypatch):
    monkeypatch.setattr(packing, "BLOCK_ELEMS", 1 << 16)  # many blocks, a ragged last one
    w = _codes(*shape)
    want = NodeVisitor.convert_to_qc4w(w)
    got = packing.pack_qc4w(w)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert got.untyped_storage().nbytes() == want.numel()  # XNNPACK serializes the whole storage
    want_e = torch.ops.quant_fusion._pack_embedding_weight(w, 4)
    assert torch.equal(packing.pack_embedding_4bit(w), want_e)
    assert not torch.equal(want, want_e)  # control: the two layouts differ (nibble order)


def test_lowering_uses_them_and_puts_executorchs_back(monkeypatch):
    calls = []
    orig = NodeVisitor.convert_to_qc4w
    real_q = packing.pack_qc4w
    monkeypatch.setattr(packing, "pack_qc4w", lambda w: (calls.append("qc4w"), real_q(w))[1])
    real_e = packing.pack_embedding_4bit
    monkeypatch.setattr(packing, "pack_embedding_4bit", lambda w: (calls.append("embed"), real_e(w))[1])
    w = _codes(16, 64)
    with packing.chunked_packing():
        a = NodeVisitor.convert_to_qc4w(w)
        b = torch.ops.quant_fusion._pack_embedding_weight(w, 4)
        c = torch.ops.quant_fusion._pack_embedding_weight(w.clamp(-2, 1), 2)  # other widths: ExecuTorch's own
        with pytest.raises(AssertionError, match="out of"):
            NodeVisitor.convert_to_qc4w(w * 2)  # control: its range check is kept
    assert calls == ["qc4w", "embed"] and c.shape == (16, 16)
    assert NodeVisitor.convert_to_qc4w is orig
    torch.ops.quant_fusion._pack_embedding_weight(w, 4)
    assert calls == ["qc4w", "embed"]  # restored
    assert torch.equal(a, orig(w)) and torch.equal(b, real_e(w))
