"""Helpers shared by test modules (kept here so no test module imports another)."""

from __future__ import annotations

import numpy as np
import torch


def graph_structure(gm) -> list:
    """A graph as its nodes in order, each (kind, target, arguments with nodes as positions):
    what a re-trace that renames nodes keeps."""
    where = {n: i for i, n in enumerate(gm.graph.nodes)}

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return ("node", where[a])
        if isinstance(a, (list, tuple)):
            return type(a).__name__, tuple(arg(x) for x in a)
        if isinstance(a, dict):
            return "dict", tuple((k, arg(v)) for k, v in a.items())
        return repr(a)

    return [(n.op, str(n.target) if n.op != "placeholder" else n.name, arg(n.args), arg(n.kwargs))
            for n in gm.graph.nodes]


def count_decompositions(monkeypatch) -> list:
    """Whole-program re-traces (ExportedProgram.run_decompositions) from here until
    monkeypatch.undo(): one entry per call."""
    calls, decompose = [], torch.export.ExportedProgram.run_decompositions

    def counted(self, *a, **k):
        calls.append(1)
        return decompose(self, *a, **k)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", counted)
    return calls


def run_tflite_prefill_decode(path, prompt_len: int, seed: int = 0):
    """Both signatures of a converted LiteRT decoder on one random prompt: prefill's outputs
    (caches included), then decode's outputs for one token read from those caches."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    pre, dec = it.get_signature_runner("prefill"), it.get_signature_runner("decode")
    caches = {n: np.zeros(d["shape"], np.float32) for n, d in pre.get_input_details().items() if n.startswith("kv_cache")}
    toks = np.random.default_rng(seed).integers(1, 200, size=(1, prompt_len)).astype(np.int32)
    out = pre(tokens=toks, input_pos=np.arange(prompt_len, dtype=np.int32), **caches)
    res = dec(tokens=np.array([[7]], np.int32), input_pos=np.array([prompt_len], np.int32),
              **{n: out[n] for n in caches})
    return out, res
