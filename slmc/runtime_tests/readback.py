"""Read quantized tensors back out of an artifact and compare them with slmc's codes.

The claim "the artifact holds slmc's codes and scales unchanged" is checked on the
artifact's bytes, not on anything slmc kept on the side. For each QuantWeight of the
reference IR, `check_*` rebuilds the exact byte image the runtime's storage format
gives those codes (nibble order, code offset, scale dtype) and looks for it among the
tensors stored in the artifact. The result lists every tensor that was not found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compiler.ir import Model, QuantWeight, named_weights


@dataclass
class Readback:
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # "path: what was not found"

    @property
    def exact(self) -> bool:
        return self.checked > 0 and not self.missing


def _bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _signed(w: QuantWeight) -> torch.Tensor:
    """Codes in the signed range every runtime stores (asymmetric ones shifted by 2^(b-1))."""
    if w.symmetric:
        return w.codes.to(torch.int16)
    return w.codes.to(torch.int16) - 2 ** (w.bits - 1)


def pack_nibbles(codes: torch.Tensor, low_first: bool) -> bytes:
    """Two signed int4 codes per byte, stored as code + 8."""
    c = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(codes.shape[0], -1, 2)
    lo, hi = (c[..., 0], c[..., 1]) if low_first else (c[..., 1], c[..., 0])
    return _bytes(hi << 4 | lo)


def _pte_blobs(path: Path) -> list[bytes]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(path.read_bytes())
    blobs = [bytes(b.storage) for b in pte.program.constant_buffer]
    if pte.named_data is not None:
        blobs += [bytes(getattr(b, "buffer", b)) for b in pte.named_data.buffers]
    return blobs


def _expected_pte(path: str, w: QuantWeight, embedding: bool) -> list[tuple[str, bytes]]:
    codes = _signed(w)
    if embedding:  # quantized_decomposed::embedding_4bit / embedding_byte
        data = pack_nibbles(codes, low_first=False) if w.bits == 4 else _bytes(codes.to(torch.int8))
        out = [("codes", data), ("scales", _bytes(w.scales.float()))]
        if w.zeros is not None:
            out.append(("zeros", _bytes(w.zeros.float() - 2 ** (w.bits - 1))))
        return out
    # XNNPACK: int4 nibbles low-first with +8, or raw int8; blockwise scales as bf16,
    # per-channel ones as fp32
    data = pack_nibbles(codes, low_first=True) if w.bits == 4 else _bytes(codes.to(torch.int8))
    blockwise = w.group_size < w.shape[1]
    return [("codes", data), ("scales", _bytes(w.scales.to(torch.bfloat16) if blockwise else w.scales.float()))]


def check_pte(model: Model, artifact: Path) -> Readback:
    blobs = _pte_blobs(Path(artifact))
    rb = Readback()
    embed = model.embed if isinstance(model.embed, QuantWeight) else None
    for path, w in named_weights(model):
        if not isinstance(w, QuantWeight):
            continue
        rb.checked += 1
        for what, data in _expected_pte(path, w, embedding=w is embed):
            if not any(b.startswith(data) for b in blobs):
                rb.missing.append(f"{path}: {what} ({len(data)} bytes) not stored unchanged")
    return rb


def _mil_dequant_consts(package: Path) -> list[dict]:
    """Every constexpr_blockwise_shift_scale of every function, as numpy arrays."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    ml = ct.models.MLModel(str(package), skip_model_load=True)
    spec = ml.get_spec()
    prog = load(model_spec=spec, specification_version=spec.specificationVersion,
                file_weights_dir=ml.weights_dir)
    found = []
    for f in prog.functions.values():
        for op in f.operations:
            if op.op_type == "constexpr_blockwise_shift_scale":
                ins = {k: v.val for k, v in op.inputs.items()}
                found.append({k: (None if v is None else torch.from_numpy(v.astype("float32")))
                              for k, v in ins.items()})
    return found


def check_mlpackage(model: Model, artifact: Path) -> Readback:
    """Core ML: each QuantWeight must be one constexpr_blockwise_shift_scale whose data,
    scale and offset equal slmc's codes (signed), scales and zeros (shifted alike)."""
    ops = _mil_dequant_consts(Path(artifact))
    rb = Readback()
    for path, w in named_weights(model):
        if not isinstance(w, QuantWeight):
            continue
        rb.checked += 1
        codes = _signed(w).float()
        zeros = None if w.zeros is None else w.zeros.float() - (2 ** (w.bits - 1))
        hit = any(
            op["data"].shape == codes.shape and torch.equal(op["data"], codes)
            and torch.equal(op["scale"].reshape(w.scales.shape), w.scales.float())
            and (zeros is None and (op.get("offset") is None or not op["offset"].any())
                 or zeros is not None and op.get("offset") is not None
                 and torch.equal(op["offset"].reshape(zeros.shape), zeros))
            for op in ops)
        if not hit:
            rb.missing.append(f"{path}: no constexpr_blockwise_shift_scale holds its codes/scales/offsets")
    return rb


def _tflite_contents(artifact: Path) -> tuple[dict[bytes, set[int]], list[tuple[bytes, bytes]]]:
    """({buffer bytes: TFLite types of the tensors reading it}, [(per-axis scales, zero points)])."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as S

    data = Path(artifact).read_bytes()
    mt = S.ModelT.InitFromPackedBuf(bytearray(data), 0)
    raw = []
    for b in mt.buffers:
        if b.offset > 1:
            raw.append(data[b.offset:b.offset + b.size])
        else:
            raw.append(b"" if b.data is None else np.asarray(b.data, np.uint8).tobytes())
    types: dict[bytes, set[int]] = {}
    axis = []
    for sg in mt.subgraphs:
        for t in sg.tensors:
            if raw[t.buffer]:
                types.setdefault(raw[t.buffer], set()).add(t.type)
            q = t.quantization
            if q is not None and q.scale is not None and len(q.scale) > 1:
                axis.append((np.asarray(q.scale, np.float32).tobytes(), np.asarray(q.zeroPoint, np.int64).tobytes()))
    return types, axis


def check_tflite(model: Model, artifact: Path) -> Readback:
    """LiteRT: each QuantWeight's codes must be an INT4 (two's-complement nibbles, even index
    low) or INT8 constant; its scales either that tensor's per-axis scales (with the zero
    points) or a float32 constant (fp16 when every scale is an fp16 value, as a
    BlockwiseQuantization filter's are), and the zeros another float32 constant."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as S

    types, axis = _tflite_contents(Path(artifact))
    rb = Readback()
    for path, w in named_weights(model):
        if not isinstance(w, QuantWeight):
            continue
        rb.checked += 1
        codes = _signed(w).numpy().astype(np.int8).reshape(-1)
        if w.bits == 4:
            nib = (codes.astype(np.uint8) & 0xF)
            nib = np.append(nib, np.uint8(0)) if nib.size % 2 else nib
            image, typ = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes(), S.TensorType.INT4
        else:
            image, typ = codes.tobytes(), S.TensorType.INT8
        if typ not in types.get(image, ()):
            rb.missing.append(f"{path}: codes not stored as an int{w.bits} tensor")
        scales = _bytes(w.scales.float())
        zeros = None if w.zeros is None else (w.zeros.float() - 2 ** (w.bits - 1))
        f32 = S.TensorType.FLOAT32
        s32 = w.scales.float().numpy()
        s16 = s32.astype(np.float16)  # fp16 constants (or a BlockwiseQuantization filter's scales)
        fp16 = np.array_equal(s16.astype(np.float32), s32) and S.TensorType.FLOAT16 in types.get(s16.tobytes(), ())
        consts = (f32 in types.get(scales, ()) or fp16) and (zeros is None or f32 in types.get(_bytes(zeros), ()))
        if w.group_size == w.shape[1]:  # per channel: per-axis metadata, or constants as below
            z = np.zeros(w.shape[0], np.int64) if zeros is None else zeros.numpy().astype(np.int64)
            if (scales, z.tobytes()) not in axis and not consts:
                rb.missing.append(f"{path}: per-axis scales/zero points not stored unchanged")
        else:
            if not consts:
                rb.missing.append(f"{path}: scales (or zero points) not stored unchanged")
    return rb
