"""LiteRT conversion one signature at a time (slmc/targets/tflite/staged.py), observed beside
litert_torch's own Converter.convert on the same model: the flatbuffer is byte-identical; the
first signature's exported program is gone before the second is exported; no graph the
conversion made is alive while folding; torch's lazy GraphModules generate less code.
Controls: litert_torch's converter still holds the first program and graphs while folding,
and generates more code, so those probes can fail; a model one weight-ulp apart gives other
bytes, so the comparison can; another litert_torch is refused. torch's tracer holds its last
graph until slmc lets it go (drop_last_trace)."""

import gc
import weakref

import pytest
import torch

pytest.importorskip("litert_torch")

from slmc import api  # noqa: E402
from slmc.errors import SlmcError  # noqa: E402
from slmc.targets.tflite import staged  # noqa: E402
from slmc.targets.tflite import target as T  # noqa: E402

P = 8


def _default(signatures, lightweight_conversion):
    from litert_torch._convert import core

    return core.convert_signatures(signatures, lightweight_conversion=lightweight_conversion)._exporter


def _observed(model, monkeypatch, default: bool = False) -> dict:
    """One conversion (slmc's, or litert_torch's with default=True) with probes: its bytes,
    whether the first exported program is referenced when the second export starts, how many
    torch.fx graphs it made are alive when runtime constant folding starts (the conversion's
    highest memory on SmolLM2-135M; graphs other tests left are not counted), and how many
    times torch.fx generated a graph's Python code."""
    import litert_torch._convert.core as core
    from litert_torch._convert import runtime_fold
    from torch.fx import graph as fx_graph

    seen = {"programs": [], "alive": [], "graphs": [], "codegens": 0}
    gc.collect()
    earlier = weakref.WeakSet(o for o in gc.get_objects() if isinstance(o, torch.fx.Graph))
    export, fold, gen = core.export_torch_signature, runtime_fold.runtime_fold, fx_graph.CodeGen._gen_python_code

    def watched(sig, *args, **kwargs):
        if seen["programs"]:
            gc.collect()
            seen["alive"].append(seen["programs"][0]() is not None)
        program = export(sig, *args, **kwargs)
        seen["programs"].append(weakref.ref(program))
        return program

    def counted_fold(*args, **kwargs):
        gc.collect()
        seen["graphs"].append(sum(isinstance(o, torch.fx.Graph) and o not in earlier for o in gc.get_objects()))
        return fold(*args, **kwargs)

    def counted_gen(self, *args, **kwargs):
        seen["codegens"] += 1
        return gen(self, *args, **kwargs)

    monkeypatch.setattr(core, "export_torch_signature", watched)
    monkeypatch.setattr(runtime_fold, "runtime_fold", counted_fold)
    monkeypatch.setattr(fx_graph.CodeGen, "_gen_python_code", counted_gen)
    if default:
        monkeypatch.setattr(staged, "convert_signatures", _default)
    path, _ = T.convert(model, P)
    monkeypatch.undo()
    assert len(seen["programs"]) == 2 and len(seen["alive"]) == 1 and len(seen["graphs"]) == 1
    return {"bytes": path.read_bytes(), "alive": seen["alive"][0], "graphs": seen["graphs"][0],
            "codegens": seen["codegens"]}


def test_staged_beside_litert_torch_converter(tiny_llama_dir, monkeypatch):
    model = api.load(str(tiny_llama_dir))
    ours, theirs = _observed(model, monkeypatch), _observed(model, monkeypatch, default=True)
    assert ours["bytes"] == theirs["bytes"]
    assert not ours["alive"] and theirs["alive"]  # the first program: dropped / still held (control)
    assert ours["graphs"] == 0 < theirs["graphs"]  # while folding
    assert 0 < ours["codegens"] < theirs["codegens"]  # lazy GraphModules
    w = model.blocks[0].attn.o.weight.data  # control: one weight one ulp up, other bytes
    w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert _observed(model, monkeypatch)["bytes"] != theirs["bytes"]


def test_another_litert_torch_is_refused(monkeypatch):
    from litert_torch._convert import litert_converter

    monkeypatch.delattr(litert_converter, "_get_output_names")
    with pytest.raises(SlmcError, match="_get_output_names.*pinned version"):
        staged.convert_signatures([])


def test_drop_last_trace_lets_the_graph_go():
    from slmc.compiler.lowering.export import drop_last_trace

    def traced() -> weakref.ref:
        program = torch.export.export(torch.nn.Linear(4, 4), (torch.zeros(1, 4),), strict=False)
        del program
        from torch.fx.experimental import proxy_tensor

        node = next(iter(proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT.values()))
        return weakref.ref(node.graph)

    graph = traced()
    gc.collect()
    assert graph() is not None  # control: torch's tracer still holds the exported graph
    drop_last_trace()
    gc.collect()
    assert graph() is None
