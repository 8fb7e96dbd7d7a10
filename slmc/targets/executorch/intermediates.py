"""Hidden states of a .pte flow (slmc diff): a debug program of the same lowered decoder, with
the residual stream as an extra output (compiler/lowering/taps.py), run in ExecuTorch's runtime.

Why a debug program and not ETDump: XNNPACK takes the whole decoder into its delegate, and
ETDump's intermediate outputs stop at delegate boundaries (one blob per partition), so the
per-block states are never visible there. The debug program is lowered with the artifact's
spec (backend, partitioner, quantized kernels) from the same IR; `diff` checks that its last
logits row agrees with the artifact's own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ...compiler.ir import Model
from ...compiler.lowering import LoweredLM, LoweringSpec
from ...compiler.lowering.taps import Tapped
from ...errors import UnsupportedError
from ..base import Intermediates
from .backends import BACKENDS
from .moe import FORMAT, has_offload_plan
from .program import ExecuTorchSpec, to_pte


def debug_program(model: Model, manifest: dict, ids: list[int]) -> tuple[bytes, str]:
    """The debug .pte's bytes (static T = len(ids); outputs: logits of every row, then the hidden
    states) and how it was made. `slmc validate --by-block --on` runs these bytes on a device."""
    if manifest.get("format") == FORMAT or has_offload_plan(model):
        raise UnsupportedError("slmc diff has no debug program for expert-offload .pte artifacts", "executorch")
    spec = ExecuTorchSpec(**manifest.get("spec", {"backend": manifest.get("backend", "xnnpack")}))
    backend = BACKENDS[spec.backend_name]
    if not backend.host_runnable:
        raise UnsupportedError(f"a .pte for the {spec.backend} backend cannot run on this host "
                               f"({backend.note or 'no delegate in this runtime'})", "executorch")
    lm = LoweredLM(model, LoweringSpec(full_logits=True)).eval()
    args = (torch.tensor([ids], dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    with torch.no_grad():
        ep = torch.export.export(Tapped(lm, lm).eval(), args, strict=False)  # static T = len(ids)
    data, _ = to_pte(ep, spec)
    return data, f"debug .pte ({spec.backend}) with the hidden states as an extra output"


def hidden_states(model: Model, manifest: dict, ids: list[int]) -> Intermediates:
    data, how = debug_program(model, manifest, ids)
    args = (torch.tensor([ids], dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    import executorch.kernels.quantized  # noqa: F401  registers quantized kernels
    from executorch.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="slmc-diff-") as tmp:
        path = Path(tmp) / "debug.pte"
        path.write_bytes(data)
        out = Runtime.get().load_program(str(path)).load_method("forward").execute(list(args))
    logits, states = out[0], out[-1]
    return Intermediates(states=states.float().clone(), logits=logits.reshape(len(ids), -1).float().clone(),
                         runtime="executorch", how=how)
