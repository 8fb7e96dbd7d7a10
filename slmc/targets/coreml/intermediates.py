"""Hidden states of a Core ML flow (slmc diff): a debug package of the same lowered decoder
(coreml_module: the artifact's components, precision, KV kind and layout) whose one function
`main` takes the whole prompt and also returns the residual stream (compiler/lowering/taps.py),
run by slmc's MIL interpreter (mil_interp.py), which rounds every op to the program's dtype.

The interpreter can read any var of the artifact itself, but its vars are named after
torch.export's nodes (add_12, ...), not after blocks; the debug package names its output.
`diff` checks its last logits row against the artifact's own session.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ...compiler.ir import Model
from ...compiler.lowering.taps import Tapped
from ..base import Intermediates
from ..coreml_import import coremltools
from .mil_interp import MILProgram
from .module import coreml_module
from .names import fresh_op_names
from .reshape_solve import solved_once
from .validate_once import validated_once


def hidden_states(model: Model, manifest: dict, ids: list[int], spec, units: str, quiet) -> Intermediates:
    """spec: the artifact's CoreMLSpec; units: its coremltools compute units; quiet(fn, ...): how
    the target calls the converter (target.py)."""
    ct = coremltools()

    T = len(ids)
    module = coreml_module(model, spec.stateful, spec.precision == "fp16", spec.ane_layout).eval()
    mask_dt = np.float16 if spec.deployment_target >= "ios16" else np.float32
    args = [torch.tensor([ids], dtype=torch.int32), torch.zeros(1, 1, T, T)]
    inputs = [ct.TensorType(name="inputIds", shape=(1, T), dtype=np.int32),
              ct.TensorType(name="causalMask", shape=(1, 1, T, T), dtype=mask_dt)]
    cache_dt = np.float16 if manifest["kv_cache"]["dtype"] == "float16" else np.float32
    names = ["logits", "hidden_states"]
    if not spec.stateful:
        args += [torch.zeros(module.cache_shape), torch.zeros(module.cache_shape)]
        inputs += [ct.TensorType(name=n, shape=module.cache_shape, dtype=cache_dt) for n in ("keyCache", "valueCache")]
        names = ["logits", "presentKeys", "presentValues", "hidden_states"]
    # the wrapper holds the decoder as `inner`, so its cache buffers are inner.keyCache/valueCache
    states = [ct.StateType(ct.TensorType(shape=module.cache_shape, dtype=np.float16), name=f"inner.{n}")
              for n in ("keyCache", "valueCache")] if spec.stateful else None
    with torch.no_grad():
        ep = torch.export.export(Tapped(module, module).eval(), tuple(args), strict=False).run_decompositions({})
    fresh_op_names()
    with validated_once(), solved_once():
        ml = quiet(ct.convert, ep, inputs=inputs, outputs=[ct.TensorType(name=n) for n in names], states=states,
                   convert_to="mlprogram", skip_model_load=True,
                   minimum_deployment_target=getattr(ct.target, "iOS" + spec.deployment_target[3:]),
                   compute_precision=ct.precision.FLOAT16 if spec.precision == "fp16" else ct.precision.FLOAT32,
                   compute_units=getattr(ct.ComputeUnit, units))
    shape = tuple(module.cache_shape)
    del ep, module
    with tempfile.TemporaryDirectory(prefix="slmc-diff-") as tmp:
        pkg = Path(tmp) / "debug.mlpackage"
        ml.save(str(pkg))
        feeds = {"inputIds": np.array([ids], dtype=np.int32), "causalMask": np.zeros((1, 1, T, T), mask_dt)}
        prog = MILProgram(pkg)
        if spec.stateful:
            caches = {n: np.zeros(shape, np.float16) for n in prog.state_names("main")}
        else:
            caches = {n: np.zeros(shape, cache_dt) for n in ("keyCache", "valueCache")}
            feeds.update(caches)
        out = prog.run("main", feeds, caches)
    logits = torch.from_numpy(np.asarray(out["logits"], dtype=np.float32)).reshape(T, -1)
    states = torch.from_numpy(np.asarray(out["hidden_states"], dtype=np.float32))
    return Intermediates(states=states, logits=logits, runtime="coreml-mil-interpreter",
                         how=f"debug .mlpackage ({spec.precision}, {'states' if spec.stateful else 'kv io'}) "
                             "with the hidden states as an extra output, run by slmc's MIL interpreter")
