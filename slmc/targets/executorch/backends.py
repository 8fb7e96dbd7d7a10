"""ExecuTorch backends as data: how to partition for each, whether prefill can use a
dynamic length, whether this host's runtime can run the result, and what is missing
on this machine (vendor SDKs are never downloaded by slmc)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..quant_rules import QuantRules
from .rules import XNNPACK


@dataclass(frozen=True)
class ETBackend:
    name: str
    dynamic: bool  # prefill takes T > 1 in one call (else the runner prefills token by token)
    host_runnable: bool  # the pip ExecuTorch runtime on this host has the delegate's kernels
    partitioners: Callable[[object], list]
    missing: Callable[[], str | None] = lambda: None  # why it can't compile here, or None
    note: str = ""
    # which quantized tensors it holds exactly (default: none; slmc never re-rounds silently)
    quant: QuantRules = QuantRules("this ExecuTorch backend", linear=None, embedding=None)


def _xnnpack(spec):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return [XnnpackPartitioner()]


def _vulkan(spec):
    from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

    return [VulkanPartitioner({"require_dynamic_shapes": True, "force_fp16": False})]


def _coreml(spec):
    from ..coreml_import import coremltools

    ct = coremltools()  # first, so that it loads without scikit-learn (targets/coreml_import.py)
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=ct.target.iOS18, compute_unit=ct.ComputeUnit.ALL,
        compute_precision=ct.precision.FLOAT16 if spec.fp16 else ct.precision.FLOAT32,
        model_type=CoreMLBackend.MODEL_TYPE.MODEL)
    return [CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=False)]


def _qnn_missing() -> str | None:
    root = os.environ.get("QNN_SDK_ROOT")
    hint = ("install Qualcomm AI Engine Direct (QAIRT) 2.x from https://qpm.qualcomm.com, then "
            "`export QNN_SDK_ROOT=/path/to/qairt/<version>` and add $QNN_SDK_ROOT/lib/x86_64-linux-clang "
            "to LD_LIBRARY_PATH")
    if not root:
        return f"the QNN backend needs the Qualcomm QNN SDK, and QNN_SDK_ROOT is not set: {hint}"
    lib = Path(root) / "lib" / "x86_64-linux-clang" / "libQnnHtp.so"
    if not lib.is_file():
        return f"QNN_SDK_ROOT={root} has no {lib.relative_to(root)}: {hint}"
    return None


def _qnn(spec):
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
    )

    soc = getattr(QcomChipset, spec.soc)
    opts = generate_htp_compiler_spec(use_fp16=True)
    return [QnnPartitioner(generate_qnn_executorch_compiler_spec(soc_model=soc, backend_options=opts))]


def _mediatek_missing() -> str | None:
    if importlib.util.find_spec("mtk_converter") is None:
        return ("the MediaTek backend needs MediaTek's NeuroPilot Express SDK: install its `mtk_converter` "
                "wheel (from the NeuroPilot portal, https://neuropilot.mediatek.com) into this environment")
    return None


def _mediatek(spec):
    from executorch.backends.mediatek import NeuropilotPartitioner
    from executorch.exir.backend.compile_spec_schema import CompileSpec

    # NeuropilotBackend requires "platform-config" (the APU generation, e.g. mt6989).
    return [NeuropilotPartitioner([CompileSpec("platform-config", spec.soc.encode())])]


BACKENDS: dict[str, ETBackend] = {b.name: b for b in (
    ETBackend("xnnpack", dynamic=True, host_runnable=True, partitioners=_xnnpack, quant=XNNPACK),
    ETBackend("portable", dynamic=True, host_runnable=True, partitioners=lambda spec: []),
    ETBackend("vulkan", dynamic=True, host_runnable=False, partitioners=_vulkan,
              note="Android GPU; the pip runtime has no Vulkan delegate, so it runs on a device only"),
    ETBackend("coreml", dynamic=False, host_runnable=False, partitioners=_coreml,
              note="Core ML delegate; runs on Apple devices only (static shapes: the runner "
                   "prefills token by token)"),
    ETBackend("qnn", dynamic=False, host_runnable=False, partitioners=_qnn, missing=_qnn_missing,
              note="Qualcomm HTP; needs the QNN SDK to compile and a Snapdragon device to run"),
    ETBackend("mediatek", dynamic=False, host_runnable=False, partitioners=_mediatek,
              missing=_mediatek_missing, note="MediaTek APU; needs NeuroPilot to compile and a device to run"),
)}
