"""LiteRT conversion one signature at a time (slmc/targets/tflite/staged.py): the flatbuffer is
byte-identical to litert_torch's own Converter.convert, and the first signature's exported
program is gone before the second is exported. Controls: a model one weight-ulp apart gives
other bytes, so the comparison can fail; litert_torch's converter still holds the first
program at the second export and a graph while folding, so those probes can; another
litert_torch is refused. torch's tracer holds its last graph until slmc lets it go."""

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


def _convert(model, monkeypatch, default: bool = False):
    if default:
        monkeypatch.setattr(staged, "convert_signatures", _default)
    path, _ = T.convert(model, P)
    monkeypatch.undo()
    return path.read_bytes()


def _alive_at_second_export(model, monkeypatch, default: bool = False) -> bool:
    """Whether the first signature's exported program is still referenced when the second
    signature's export starts."""
    import litert_torch._convert.core as core

    programs, alive = [], []
    export = core.export_torch_signature

    def watched(sig, *args, **kwargs):
        if programs:
            gc.collect()
            alive.append(programs[0]() is not None)
        program = export(sig, *args, **kwargs)
        programs.append(weakref.ref(program))
        return program

    monkeypatch.setattr(core, "export_torch_signature", watched)
    _convert(model, monkeypatch, default)  # undoes the patch too
    assert len(programs) == 2 and len(alive) == 1
    return alive[0]


def test_same_bytes_as_litert_torch_converter(tiny_llama_dir, monkeypatch):
    model = api.load(str(tiny_llama_dir))
    staged_bytes, default = _convert(model, monkeypatch), _convert(model, monkeypatch, default=True)
    assert staged_bytes == default
    w = model.blocks[0].attn.o.weight.data  # control: one weight one ulp up, other bytes
    w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert _convert(model, monkeypatch) != default


def test_first_program_is_dropped_before_the_second_export(tiny_llama_dir, monkeypatch):
    model = api.load(str(tiny_llama_dir))
    assert not _alive_at_second_export(model, monkeypatch)
    assert _alive_at_second_export(model, monkeypatch, default=True)  # control


def test_another_litert_torch_is_refused(monkeypatch):
    from litert_torch._convert import litert_converter

    monkeypatch.delattr(litert_converter, "_get_output_names")
    with pytest.raises(SlmcError, match="_get_output_names.*pinned version"):
        staged.convert_signatures([])


def _graphs_at_runtime_fold(model, monkeypatch, default: bool = False) -> int:
    """How many torch.fx graphs made by this conversion are alive when LiteRT's runtime
    constant folding starts (the conversion's highest memory on SmolLM2-135M); graphs other
    tests left in the process are not counted."""
    from litert_torch._convert import runtime_fold

    gc.collect()
    earlier = weakref.WeakSet(o for o in gc.get_objects() if isinstance(o, torch.fx.Graph))
    fold, seen = runtime_fold.runtime_fold, []

    def counted(*args, **kwargs):
        gc.collect()
        seen.append(sum(isinstance(o, torch.fx.Graph) and o not in earlier for o in gc.get_objects()))
        return fold(*args, **kwargs)

    monkeypatch.setattr(runtime_fold, "runtime_fold", counted)
    _convert(model, monkeypatch, default)
    assert len(seen) == 1
    return seen[0]


def test_no_graph_is_alive_while_folding(tiny_llama_dir, monkeypatch):
    model = api.load(str(tiny_llama_dir))
    assert _graphs_at_runtime_fold(model, monkeypatch) == 0
    assert _graphs_at_runtime_fold(model, monkeypatch, default=True) > 0  # control


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


def _code_generations(model, monkeypatch, default: bool = False) -> int:
    """How many times torch.fx generated a graph's Python code during the conversion."""
    from torch.fx import graph as fx_graph

    made, gen = [], fx_graph.CodeGen._gen_python_code

    def counted(self, *args, **kwargs):
        made.append(1)
        return gen(self, *args, **kwargs)

    monkeypatch.setattr(fx_graph.CodeGen, "_gen_python_code", counted)
    _convert(model, monkeypatch, default)
    return len(made)


def test_lazy_graph_modules_generate_less_code(tiny_llama_dir, monkeypatch):
    model = api.load(str(tiny_llama_dir))
    lazy, eager = _code_generations(model, monkeypatch), _code_generations(model, monkeypatch, default=True)
    assert 0 < lazy < eager  # the same bytes: test_same_bytes_as_litert_torch_converter
