"""LiteRT readback: slmc's codes as INT4/INT8 tensors, scales as per-axis metadata or constants."""

from __future__ import annotations

from pathlib import Path

from ...compiler.ir import Model, QuantWeight, named_weights
from ..readback import Readback, signed_codes, tensor_bytes


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


def readback(model: Model, artifact: Path) -> Readback:
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
        codes = signed_codes(w).numpy().astype(np.int8).reshape(-1)
        if w.bits == 4:
            nib = (codes.astype(np.uint8) & 0xF)
            nib = np.append(nib, np.uint8(0)) if nib.size % 2 else nib
            image, typ = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes(), S.TensorType.INT4
        else:
            image, typ = codes.tobytes(), S.TensorType.INT8
        if typ not in types.get(image, ()):
            rb.missing.append(f"{path}: codes not stored as an int{w.bits} tensor")
        scales = tensor_bytes(w.scales.float())
        zeros = None if w.zeros is None else (w.zeros.float() - 2 ** (w.bits - 1))
        f32 = S.TensorType.FLOAT32
        s32 = w.scales.float().numpy()
        s16 = s32.astype(np.float16)  # fp16 constants (or a BlockwiseQuantization filter's scales)
        fp16 = np.array_equal(s16.astype(np.float32), s32) and S.TensorType.FLOAT16 in types.get(s16.tobytes(), ())
        consts = (f32 in types.get(scales, ()) or fp16) and (zeros is None or f32 in types.get(tensor_bytes(zeros), ()))
        if w.group_size == w.shape[1]:  # per channel: per-axis metadata, or constants as below
            z = np.zeros(w.shape[0], np.int64) if zeros is None else zeros.numpy().astype(np.int64)
            if (scales, z.tobytes()) not in axis and not consts:
                rb.missing.append(f"{path}: per-axis scales/zero points not stored unchanged")
        else:
            if not consts:
                rb.missing.append(f"{path}: scales (or zero points) not stored unchanged")
    return rb
