"""A compile holds no fp32 copy of its quantized weights (issue 17): QuantWeight.float() caches
its dequantized tensor for the reference executor's many forwards (perplexity), but passes
and the compile's own reference run read each weight a few times, and the cache then kept the
whole model in fp32 beside its codes (+4.4 GB at Llama-3.2-1B, bench/results/scale.md)."""

import torch

import slmc.passes  # noqa: F401  (registers the passes)
from slmc import api
from slmc.compiler import reference
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import QuantWeight, dequant_cache, named_weights
from slmc.compiler.pass_manager import PassManager, parse_pass


def _cached(m) -> int:
    return sum("_dequant" in w.__dict__ for _, w in named_weights(m) if isinstance(w, QuantWeight))


def _quantized(tiny_llama_dir):
    p = parse_pass("quant.gptq:bits=4,group_size=32,n_seqs=2,seq_len=16,embed_bits=8,head_bits=8,ends_group_size=0")
    return PassManager([p]).run(import_hf(tiny_llama_dir))[0]


def test_passes_leave_no_fp32_copies(tiny_llama_dir):
    m = _quantized(tiny_llama_dir)  # GPTQ runs every quantized stage through the reference
    assert _cached(m) == 0
    reference.forward(m, torch.tensor([[1, 2, 3]]))  # control: an ordinary reference run caches
    assert _cached(m) > 0


def test_compile_drops_and_does_not_refill_the_cache(tiny_llama_dir, tmp_path):
    m = _quantized(tiny_llama_dir)
    reference.forward(m, torch.tensor([[1, 2, 3]]))  # as after an eval in the same process
    assert _cached(m) > 0
    api.compile_ir(m, "tflite", "cpu", tmp_path / "tfl")  # the check bundle's reference run included
    assert _cached(m) == 0


def test_uncached_values_are_the_cached_ones(tiny_llama_dir):
    m = _quantized(tiny_llama_dir)
    w = m.blocks[0].attn.o.weight
    with dequant_cache(False):
        a = w.float()
    assert "_dequant" not in w.__dict__
    assert torch.equal(a, w.float()) and "_dequant" in w.__dict__
