"""Core ML readback: slmc's codes as constexpr_blockwise_shift_scale operands."""

from __future__ import annotations

from pathlib import Path

import torch

from ...compiler.ir import Model, QuantWeight, named_weights
from ..readback import Readback, signed_codes
from ..coreml_import import coremltools


def _mil_dequant_consts(package: Path) -> list[dict]:
    """Every constexpr_blockwise_shift_scale of every function, as numpy arrays."""
    ct = coremltools()
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


def readback(model: Model, artifact: Path) -> Readback:
    """Core ML: each QuantWeight must be one constexpr_blockwise_shift_scale whose data,
    scale and offset equal slmc's codes (signed), scales and zeros (shifted alike)."""
    ops = _mil_dequant_consts(Path(artifact))
    rb = Readback()
    for path, w in named_weights(model):
        if not isinstance(w, QuantWeight):
            continue
        rb.checked += 1
        codes = signed_codes(w).float()
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
