"""Run a Core ML artifact one step at a time, following its manifest's conventions.

On macOS the package runs in Core ML itself (`MLModel.predict`, states via `make_state`);
elsewhere coremltools cannot predict, so slmc's MIL interpreter runs the saved program.
Both drive the functions the way an app does: `prefill` for a prompt, `decode` for one
token when the package has it, with the start position carried by the causal mask's
shape (E - T) and the KV cache in states or passed back in as inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ...errors import SlmcError
from ..coreml_import import coremltools

_NP = {"float16": np.float16, "float32": np.float32, "int32": np.int32}


def _can_predict() -> bool:
    if sys.platform != "darwin":
        return False
    try:
        coremltools()
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return True


class CoreMLSession:
    def __init__(self, folder: Path, manifest: dict, use_coreml: bool | None = None):
        self.package = Path(folder) / manifest["artifact"]
        if not self.package.is_dir():
            raise SlmcError("the .mlpackage named by the manifest is missing", str(self.package))
        self.io = manifest["io"]
        self.default = manifest["default_function"]
        self.stateful = manifest["kv_cache"]["kind"] == "states"
        sig = self.io[self.default]
        self.mask_dtype = _NP[next(i for i in sig["inputs"] if i["name"] == "causalMask")["dtype"]]
        caches = sig.get("states") or [i for i in sig["inputs"] if i["name"] in ("keyCache", "valueCache")]
        self.cache_specs = {c["name"]: (tuple(c["shape"]), _NP[c["dtype"]]) for c in caches}
        self.use_coreml = _can_predict() if use_coreml is None else use_coreml
        if self.use_coreml:
            ct = coremltools()

            units = getattr(ct.ComputeUnit, manifest["compute_units"]["coremltools"])
            self.models = {fn: ct.models.MLModel(str(self.package), compute_units=units,
                                                 function_name=fn if len(self.io) > 1 else None)
                           for fn in self.io}
            self.runtime = "coreml"
        else:
            from .mil_interp import MILProgram

            self.program = MILProgram(self.package)
            self.runtime = "coreml-mil-interpreter"
        self.reset()

    def reset(self) -> None:
        if self.use_coreml and self.stateful:
            # one state for both functions: they declare the same keyCache/valueCache
            self.state = self.models[self.default].make_state()
        else:
            self.caches = {n: np.zeros(s, dtype=d) for n, (s, d) in self.cache_specs.items()}

    def _function(self, T: int) -> str:
        return "decode" if T == 1 and "decode" in self.io else self.default

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        return self.step_all(tokens, start_pos)[-1]

    def step_all(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Logits of every position, [T, vocab]: the functions return every row."""
        T, E = len(tokens), start_pos + len(tokens)
        keys, rows = np.arange(E)[None, :], np.arange(start_pos, E)[:, None]
        mask = np.where(keys <= rows, 0.0, -np.inf).astype(self.mask_dtype)[None, None]
        feeds = {"inputIds": np.array([tokens], dtype=np.int32), "causalMask": mask}
        fn = self._function(T)
        if not self.stateful:
            feeds.update(self.caches)
        if self.use_coreml:
            model = self.models[fn]
            out = model.predict(feeds, state=self.state) if self.stateful else model.predict(feeds)
        else:
            out = self.program.run(fn, feeds, self.caches)
        if not self.stateful:
            self.caches = {"keyCache": np.asarray(out["presentKeys"]),
                           "valueCache": np.asarray(out["presentValues"])}
        logits = np.asarray(out["logits"], dtype=np.float32)
        return torch.from_numpy(logits.reshape(-1, logits.shape[-1]).copy())


def open_coreml(folder: Path, manifest: dict) -> CoreMLSession:
    return CoreMLSession(folder, manifest)
