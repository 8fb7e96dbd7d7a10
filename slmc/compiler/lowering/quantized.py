"""Quantized IR weights in the lowered module: slmc's own codes, never re-rounded.

Each QuantWeight becomes a torchao IntxUnpackedToInt8Tensor built directly from its
codes, scales and zeros. After `unwrap_tensor_subclass` every use reads
`torchao.dequantize_affine(codes, [1, g], scales, zeros, int8, qmin, qmax)` (plus
torchao's per-token choose_qparams/quantize/dequantize on the input when the weight
asks for int8 activations). That one pattern is what every target's converter maps to
its native int4/int8 storage:
  ExecuTorch  XNNPACK's blockwise qb4w/qc8w GEMMs (8da4w / 8da8w), embedding_4bit/byte
  Core ML     constexpr_blockwise_shift_scale (iOS 18)
  LiteRT      blockwise/per-axis int4/int8 DEQUANTIZE tensors in the flatbuffer

Asymmetric codes are stored shifted by 2^(b-1) into the signed range (the zero point
shifts with them), because every converter above expects signed int4/int8 data;
(c - z) * s is unchanged by the shift, so the dequantized weight is bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ir import QuantWeight


def signed_codes(w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 in [-2^(b-1), 2^(b-1)-1], zero points) with (c - z) * s unchanged."""
    half = 2 ** (w.bits - 1)
    if w.symmetric:
        return w.codes.to(torch.int8), torch.zeros(w.scales.shape, dtype=torch.int8)
    codes = (w.codes.to(torch.int16) - half).to(torch.int8)
    z = w.zeros.float() - half
    # integral zero points (slmc's RTN/AWQ/GPTQ) stay int8; fractional ones (GGUF Q4_1's
    # min) stay float, which dequantize_affine accepts as well
    zeros = z.to(torch.int8) if bool((z == z.round()).all()) and z.abs().max() <= 127 else z
    return codes, zeros


def intx_parameter(w: QuantWeight, dtype: torch.dtype) -> nn.Parameter:
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

    codes, zeros = signed_codes(w)
    if zeros.dtype != torch.int8:
        zeros = zeros.to(dtype)
    # contiguous copies: XNNPACK's serializer (and others) read a constant's storage in memory
    # order, so a transposed view of the scales (quant.gptq's clip search made one) was stored
    # transposed, and the artifact ran with every group's scale in the wrong place
    codes, zeros = codes.contiguous(), zeros.contiguous()
    act = IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if w.act_bits == 8 else None
    t = IntxUnpackedToInt8Tensor(codes, w.scales.to(dtype).contiguous(), zeros, getattr(torch, f"int{w.bits}"),
                                 (1, w.group_size), dtype, act)
    return nn.Parameter(t, requires_grad=False)


def unwrap(module: nn.Module) -> nn.Module:
    """Replace the tensor subclasses by plain tensors + dequantize ops that export sees."""
    from torchao.utils import unwrap_tensor_subclass

    return unwrap_tensor_subclass(module)
