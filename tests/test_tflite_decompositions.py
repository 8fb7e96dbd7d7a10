"""LiteRT conversion with one whole-program decomposition per signature
(slmc/targets/tflite/decompositions.py): litert_torch's pre-convert decomposition is skipped,
as its V2 converter does, and the flatbuffer is byte-identical to the default converter's.
Control: without the skip the two re-traces (one per signature) come back, so the count can
fail; and a model one weight-ulp apart gives other bytes, so the comparison can."""

import contextlib

import pytest
import torch

pytest.importorskip("litert_torch")

from helpers import count_decompositions  # noqa: E402
from slmc import api  # noqa: E402
from slmc.targets.tflite import target as T  # noqa: E402

P = 8
# groups of 16 divide every tiny config's widths (qwen2_moe's shared expert is 48 wide)
RECIPE_8DA4W = "quant.rtn:bits=4,group_size=16,act_bits=8,scale_dtype=bfloat16,head_bits=4,embed_bits=4"


def _convert(model, monkeypatch, skip: bool = True):
    """The target's own conversion, counting whole-program decompositions; skip=False runs
    litert_torch's default converter (the pre-convert decomposition kept)."""
    retraces = count_decompositions(monkeypatch)
    if not skip:
        monkeypatch.setattr(T, "pre_convert_decomposition_skipped", contextlib.nullcontext)
    path, _ = T.convert(model, P)
    monkeypatch.undo()
    return path.read_bytes(), len(retraces)


def _lean_and_default(model, monkeypatch):
    (lean, n_lean), (default, n_default) = _convert(model, monkeypatch), _convert(model, monkeypatch, skip=False)
    assert n_default - n_lean == 2  # prefill, decode: one re-trace each spared
    return lean, default


def test_one_decomposition_per_signature_same_bytes(tiny_llama_dir, monkeypatch):
    model = api.load(str(tiny_llama_dir))
    lean, default = _lean_and_default(model, monkeypatch)
    assert lean == default
    w = model.blocks[0].attn.o.weight.data  # control: one weight one ulp up, other bytes
    w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert _convert(model, monkeypatch)[0] != default


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [None, RECIPE_8DA4W], ids=["float", "8da4w"])
def test_every_family_same_bytes(recipe, tmp_path, monkeypatch):
    from tiny import save_hf_model

    from slmc._api.models import parse_passes, run_passes
    from slmc.compiler.families import FAMILIES, load_all

    load_all()
    for family in sorted(FAMILIES):
        save_hf_model(FAMILIES[family].tiny_config(), tmp_path / family)
        model = api.load(str(tmp_path / family))
        if recipe:
            model, _ = run_passes(model, parse_passes([recipe]))
        lean, default = _lean_and_default(model, monkeypatch)
        assert lean == default, family
