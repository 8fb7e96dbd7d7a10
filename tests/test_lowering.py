"""The shared lowering, eager: every cache/IO convention equals the reference executor
over a prefill and a run of decode steps."""

import itertools

import pytest
import torch

from slmc.compiler import reference
from slmc.compiler.families import FAMILIES, load_all
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.lowering.module import LoweredLM, LoweringSpec

load_all()
CONVENTIONS = list(itertools.product(("buffers", "io"), ("bhsd", "bshd"), ("start", "tokens"), (False, True)))


def _run(mod: LoweredLM, ids: torch.Tensor, prefill: int, spec: LoweringSpec) -> list[torch.Tensor]:
    caches = mod.empty_caches() if spec.kv == "io" else []
    outs = []
    chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]
    with torch.no_grad():
        for a, b in chunks:
            pos = torch.arange(a, b) if spec.positions == "tokens" else torch.tensor([a])
            extra = []
            if spec.mask_input:
                keys = torch.arange(mod.max_len)
                ok = keys[None, :] <= torch.arange(a, b)[:, None]
                extra = [torch.where(ok, 0.0, float("-inf"))[None, None]]
            out = mod(ids[:, a:b], pos, *extra, *caches)
            if spec.kv == "io":
                out, *caches = out
            outs.append(out.reshape(-1, out.shape[-1])[-1])
    return outs


@pytest.mark.parametrize("kv,layout,positions,mask_input", CONVENTIONS)
def test_conventions_match_reference(tiny_llama_dir, kv, layout, positions, mask_input):
    m = import_hf(tiny_llama_dir, max_seq_len=40)
    m.kv.layout = layout
    spec = LoweringSpec(kv=kv, positions=positions, mask_input=mask_input)
    ids = torch.randint(0, m.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = reference.forward(m, ids)[0]
    outs = _run(LoweredLM(m, spec).eval(), ids, 12, spec)
    want = [ref[11]] + [ref[t] for t in range(12, 20)]
    assert max(float((a - b).abs().max()) for a, b in zip(outs, want)) < 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_lowers_exactly(family, tmp_path):
    from tiny import save_hf_model

    save_hf_model(FAMILIES[family].tiny_config(), tmp_path)
    m = import_hf(tmp_path, max_seq_len=40)
    ids = torch.randint(0, m.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    ref = reference.forward(m, ids)[0]
    spec = LoweringSpec()
    outs = _run(LoweredLM(m, spec).eval(), ids, 10, spec)
    want = [ref[9]] + [ref[t] for t in range(10, 30)]
    assert max(float((a - b).abs().max()) for a, b in zip(outs, want)) < 1e-4


def test_shared_blocks_share_parameters(tiny_llama_dir):
    m = import_hf(tiny_llama_dir, max_seq_len=40)
    n_params = sum(p.numel() for p in LoweredLM(m).parameters())
    m.layers = [0, 1, 0, 1]
    mod = LoweredLM(m)
    assert sum(p.numel() for p in mod.parameters()) == n_params
    assert len(mod.cache_shapes) == 4  # each depth keeps its own KV slot


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2_moe"])
@pytest.mark.parametrize("ane,fp16,kv,layout", [(False, False, "io", "bhsd"), (False, True, "buffers", "bshd"),
                                                (True, False, "buffers", "bhsd"), (True, True, "io", "bshd")])
def test_swift_interface_components_match_reference(family, ane, fp16, kv, layout, tmp_path):
    """The Core ML choices (stacked cache, spelled gelu, max-scaled norm; channels-first 1x1 convs
    and per-head attention) in the one decoder, eager, prefill then decode, against the reference."""
    from tiny import save_hf_model

    from slmc.compiler.lowering.module import SwiftLM
    from slmc.targets.coreml.module import coreml_components

    save_hf_model(FAMILIES[family].tiny_config(), tmp_path)
    m = import_hf(tmp_path, max_seq_len=24)
    m.kv.layout = layout
    mod = SwiftLM(m, LoweringSpec(interface="swift", kv=kv, components=coreml_components(fp16, ane))).eval()
    ids = torch.randint(0, m.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    ref = reference.forward(m, ids)[0]
    caches = mod.empty_caches() if kv == "io" else []
    got = []
    with torch.no_grad():
        for a, b in [(0, 8)] + [(t, t + 1) for t in range(8, 12)]:
            out = mod(ids[:, a:b].int(), torch.zeros(1, 1, b - a, b), *caches)
            if kv == "io":
                out, *caches = out
            got.append(out[0])
    assert max(float((g - ref[a:a + len(g)]).abs().max())
               for g, a in zip(got, [0, 8, 9, 10, 11])) < 1e-4
