"""ExecuTorch readback: slmc's codes and scales in the .pte's constant and named-data buffers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...compiler.ir import Model, QuantWeight, named_weights
from ...errors import SlmcError
from ..readback import Readback, pack_nibbles, signed_codes, tensor_bytes
from .program import shared_quant_table


def _pte_blobs(path: Path) -> list[bytes]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(path.read_bytes())
    blobs = [bytes(b.storage) for b in pte.program.constant_buffer]
    if pte.named_data is not None:
        blobs += [bytes(getattr(b, "buffer", b)) for b in pte.named_data.buffers]
    ptd = path.with_name("model.ptd")  # a tied table kept beside the .pte (program.tied_table)
    if ptd.is_file():
        from executorch.exir._serialize._cord import Cord
        from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

        blobs += [bytes(b) for b in FlatTensorSerializer().deserialize(Cord(ptd.read_bytes())).buffers]
    return blobs


def _expected_pte(path: str, w: QuantWeight, embedding: bool, swapped: bool = False) -> list[tuple[str, bytes]]:
    codes = signed_codes(w)
    if embedding:  # quantized_decomposed::embedding_4bit / embedding_byte
        # high nibble first; a table shared with the head is looked up with its column pairs
        # swapped (program.shared_quant_table), which stores the head's low-first bytes
        data = pack_nibbles(codes, low_first=swapped) if w.bits == 4 else tensor_bytes(codes.to(torch.int8))
        out = [("codes", data), ("scales", tensor_bytes(w.scales.float()))]
        if w.zeros is not None:
            out.append(("zeros", tensor_bytes(w.zeros.float() - 2 ** (w.bits - 1))))
        return out
    # XNNPACK: int4 nibbles low-first with +8, or raw int8; blockwise scales as bf16,
    # per-channel ones as fp32
    data = pack_nibbles(codes, low_first=True) if w.bits == 4 else tensor_bytes(codes.to(torch.int8))
    blockwise = w.group_size < w.shape[1]
    return [("codes", data), ("scales", tensor_bytes(w.scales.to(torch.bfloat16) if blockwise else w.scales.float()))]


def _backend(artifact: Path) -> str:
    """The manifest's backend (the lowering's nibble order of a shared table depends on it)."""
    m = artifact.with_name("manifest.json")
    if not m.is_file():
        raise SlmcError("no manifest.json beside the program: cannot tell which backend wrote it", str(artifact))
    return json.loads(m.read_text())["backend"]


def readback(model: Model, artifact: Path) -> Readback:
    artifact = Path(artifact)
    blobs = _pte_blobs(artifact)
    rb = Readback()
    embed = model.embed if isinstance(model.embed, QuantWeight) else None
    swapped = embed is not None and shared_quant_table(model, _backend(artifact)) == 4
    for path, w in named_weights(model):
        if not isinstance(w, QuantWeight):
            continue
        rb.checked += 1
        for what, data in _expected_pte(path, w, embedding=w is embed, swapped=swapped):
            if not any(b.startswith(data) for b in blobs):
                rb.missing.append(f"{path}: {what} ({len(data)} bytes) not stored unchanged")
    return rb
