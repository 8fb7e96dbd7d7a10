"""Compile memory at scale (issue 17): rewritten floats go to scratch space block by block, and
quantized weights are dequantized in pieces, never as a whole fp32 table plus temporaries."""

import copy

import numpy as np
import pytest
import torch

import slmc.passes  # noqa: F401  (registers the passes)
from slmc.compiler import ir as ir_mod
from slmc.compiler import reference
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import Linear, QuantWeight, Weight, block_linears
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.quant import QuantScheme, rtn
from slmc.compiler import spill as spill_mod
from slmc.compiler.spill import MIN_BYTES, Spill, spill_tree


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_spill_reads_back_exactly(dtype):
    t = (torch.randn(300, 1000) * 50).to(dtype)
    sp = Spill("test")
    w = sp.put(t)
    assert not w.loaded and w.dtype == ir_mod.DTYPE_NAMES[dtype] and w.shape == (300, 1000)
    assert torch.equal(w.data, t)
    w.release()  # dropped, then read again from the file
    assert not w.loaded and torch.equal(w.data, t)
    assert sp.nbytes == t.numel() * t.element_size()


def test_spill_tree_spills_rewritten_weights_once():
    big = Weight(torch.randn(MIN_BYTES // 4 + 1))
    small = Weight(torch.randn(10))
    lazy = Weight(shape=(MIN_BYTES,), dtype="float32", loader=lambda: torch.zeros(MIN_BYTES))
    a, b, c = Linear(big), Linear(big), Linear(lazy, small)  # a and b share one tensor
    tree = [a, b, c]
    lazy.data  # read by the pass: resident until released
    sp = Spill("test")
    assert spill_tree(tree, sp) == big.nbytes()  # once, though two linears hold it
    assert a.weight is b.weight and a.weight is not big and torch.equal(a.weight.data, big.data)
    assert c.weight is lazy and not lazy.loaded  # re-readable: released, not copied
    assert c.bias is small and small.loaded  # too small to matter


def test_awq_scales_only_leaves_the_model_re_readable(tiny_llama_dir, monkeypatch):
    """quant.awq:quantize=false (the recipes' first pass) leaves its folded floats in scratch
    space, not resident; the function is unchanged (the fold is exact in float)."""
    monkeypatch.setattr(spill_mod, "MIN_BYTES", 4096)  # the tiny model's linears count as big
    m = import_hf(tiny_llama_dir)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    before = reference.forward(m, ids)
    p = parse_pass("quant.awq:bits=4,group_size=32,quantize=false,n_seqs=2,seq_len=16")
    out, logs = PassManager([p]).run(m)
    assert logs[0].info["spilled_mib"] > 0
    lins = [lin for _, lin in block_linears(out)]
    big = [lin.weight for lin in lins if lin.weight.nbytes() >= 4096]
    assert big, "the tiny model must have linears over the spill threshold for this test to mean anything"
    assert all(not w.loaded and w._loader is not None for w in big)
    torch.testing.assert_close(reference.forward(out, ids), before, rtol=1e-4, atol=1e-4)
    copy.deepcopy(out)  # a model holding spilled weights still copies (the loader is a closure)


def _quant(rows, cols, symmetric=True, g=32):
    return rtn(torch.randn(rows, cols), QuantScheme(bits=4, group_size=g, symmetric=symmetric), "rtn")


@pytest.mark.parametrize("symmetric", [True, False])
def test_chunked_dequant_is_exact(monkeypatch, symmetric):
    w = _quant(70, 64, symmetric)
    g = w.group_size
    z = w.zeros.float().repeat_interleave(g, 1) if w.zeros is not None else 0.0
    whole = (w.codes.float() - z) * w.scales.float().repeat_interleave(g, 1)
    monkeypatch.setattr(ir_mod, "DEQUANT_CHUNK", 64 * 3)  # 3 rows a chunk, a short last chunk
    with ir_mod.dequant_cache(False):
        assert torch.equal(w.float(), whole)
    idx = torch.tensor([5, 0, 69, 5])
    assert torch.equal(w.rows(idx), whole[idx])


def test_reference_ends_dequantize_in_pieces(tiny_llama_dir, monkeypatch):
    """A quantized embedding is looked up row by row and a big quantized head multiplied in row
    chunks; the logits are the whole-table ones."""
    m = import_hf(tiny_llama_dir)
    p = parse_pass("quant.rtn:bits=4,group_size=32,embed_bits=4,head_bits=4")
    m = PassManager([p]).run(m)[0]
    assert isinstance(m.embed, QuantWeight)
    ids = torch.tensor([[3, 14, 15, 3, 92, 65, 14, 35]])
    with ir_mod.dequant_cache(False):
        whole = reference.forward(m, ids)
        monkeypatch.setattr(reference, "BIG", 1000)  # every quantized weight counts as big
        calls = []
        real = QuantWeight.float
        monkeypatch.setattr(QuantWeight, "float", lambda self: calls.append(self) or real(self))
        pieces = reference.forward(m, ids)
    assert calls == []  # no whole-table dequantization on the big path
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)


def test_data_free_sampling_leaves_the_model_lazy(tiny_llama_dir):
    """Sampling reads every weight; the checkpoint's are dropped again after it, so the
    block-by-block pass that asked for the samples starts from a lazy model."""
    from slmc.compiler.calib import sample_ids
    from slmc.compiler.ir import named_weights

    m = import_hf(tiny_llama_dir)
    lazy = [w for _, w in named_weights(m) if isinstance(w, Weight) and w._loader is not None and not w.loaded]
    assert lazy
    ids = sample_ids(m, 2, 8, seed=12345)
    assert ids.shape == (2, 8)
    assert not any(w.loaded for w in lazy)


def test_rotation_leaves_its_rewritten_model_on_disk(tiny_llama_dir, monkeypatch):
    """quant.rotate rewrites every linear, the embedding and the (untied) head: they go to
    scratch space, and the logits are unchanged."""
    from slmc.compiler.ir import named_weights

    monkeypatch.setattr(spill_mod, "MIN_BYTES", 4096)
    m = import_hf(tiny_llama_dir)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    before = reference.forward(m, ids)
    out, logs = PassManager([parse_pass("quant.rotate:untie=true")]).run(m)
    assert logs[0].info["spilled_mib"] > 0
    big = [w for _, w in named_weights(out) if isinstance(w, Weight) and w.nbytes() >= 4096]
    assert big and all(not w.loaded for w in big)
    assert out.lm_head is not None and out.lm_head.weight in big and out.embed in big
    torch.testing.assert_close(reference.forward(out, ids), before, rtol=1e-4, atol=1e-4)


def test_checkpoint_reads_are_exact_and_unmapped(tmp_path):
    """Weights are read from the file, not mapped: equal to safetensors' own reading, for every
    dtype, and the file never appears in the process's mappings (mapped pages count in RSS)."""
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    from slmc.compiler.importers.safetensors_source import SafetensorsSource

    ts = {"f32": torch.randn(33, 7), "bf16": torch.randn(5, 64).bfloat16(), "f16": torch.randn(9).half(),
          "i8": torch.randint(-128, 127, (4, 4), dtype=torch.int8), "empty": torch.zeros(0, 3)}
    p = tmp_path / "w.safetensors"
    save_file(ts, str(p))
    src = SafetensorsSource([p])
    got = {n: src.weight(n).data for n in ts}
    assert str(p) not in Path("/proc/self/maps").read_text()
    with safe_open(str(p), framework="pt") as h:
        for n in ts:
            assert torch.equal(got[n], h.get_tensor(n)) and got[n].dtype == ts[n].dtype


def test_fingerprint_reads_leave_the_model_lazy(tiny_llama_dir):
    """The samples' cache key reads every weight; each is dropped right after (else the
    sampling module's fp32 copies sat beside the whole bf16 checkpoint: OOM at 3B)."""
    from slmc.compiler.calib import fingerprint
    from slmc.compiler.ir import named_weights

    m = import_hf(tiny_llama_dir)
    lazy = [w for _, w in named_weights(m) if isinstance(w, Weight) and w._loader is not None and not w.loaded]
    a = fingerprint(m)
    assert lazy and not any(w.loaded for w in lazy)
    assert fingerprint(m) == a


def test_lowered_weights_are_file_backed_and_exact(tiny_llama_dir, monkeypatch):
    """Lowering maps every big float Parameter from a scratch file (heap copies freed: the
    rewritten fused projections' IR copy becomes the mapped one, the checkpoint's is dropped);
    the module computes the same logits before and after its pages are let go."""
    from slmc.compiler.ir import named_weights
    from slmc.compiler.lowering.export import example_inputs
    from slmc.compiler.lowering.module import LoweredLM

    monkeypatch.setattr(spill_mod, "MIN_BYTES", 1 << 30)  # nothing mapped: the heap baseline
    m = PassManager([parse_pass("canon.fuse_projections")]).run(import_hf(tiny_llama_dir))[0]
    ids, pos = example_inputs(m, 4)
    with torch.no_grad():
        plain = LoweredLM(m).eval()(ids, pos)
    assert not any(spill_mod.file_backed(p) for p in LoweredLM(m).parameters())
    monkeypatch.setattr(spill_mod, "MIN_BYTES", 4096)
    fused = [w for _, w in named_weights(m) if isinstance(w, Weight) and w._loader is None and w.nbytes() >= 4096]
    lazy = [w for _, w in named_weights(m) if isinstance(w, Weight) and w._loader is not None]
    assert fused and lazy, "the tiny model needs rewritten and checkpoint weights over the threshold"
    mod = LoweredLM(m).eval()
    big = [p for p in mod.parameters() if p.nbytes >= 4096]
    assert big and all(spill_mod.file_backed(p) for p in big)
    assert all(spill_mod.file_backed(w.data) for w in fused)  # the IR shares the mapped copy
    assert not any(w.loaded for w in lazy if w.nbytes() >= 4096)
    spill_mod.page_out_weights()  # pages dropped: read again from the scratch file
    with torch.no_grad():
        assert torch.equal(mod(ids, pos), plain)


def test_read_through_keeps_no_weight(tiny_llama_dir):
    """Inside read_through() a lazy weight is read at each use and never kept: the reference
    run of the check bundle holds one weight at a time; its logits are the cached run's."""
    from slmc.compiler.ir import named_weights, read_through

    m = import_hf(tiny_llama_dir)
    lazy = [w for _, w in named_weights(m) if isinstance(w, Weight) and w._loader is not None]
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with read_through():
        through = reference.forward(m, ids)
    assert lazy and not any(w.loaded for w in lazy)
    cached = reference.forward(m, ids)
    assert all(w.loaded for w in lazy)
    assert torch.equal(through, cached)


def test_fused_projections_go_to_scratch_space(tiny_llama_dir, monkeypatch):
    """canon.fuse_projections' new q/k/v and gate/up weights are spilled as they are made:
    the model stays lazy, and the logits are the unfused model's."""
    from slmc.compiler.ir import named_weights, read_through

    monkeypatch.setattr(spill_mod, "MIN_BYTES", 4096)
    m = import_hf(tiny_llama_dir)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with read_through():  # leaves the checkpoint's weights unread
        before = reference.forward(m, ids)
    out, logs = PassManager([parse_pass("canon.fuse_projections")]).run(m)
    assert logs[0].info["spilled_mib"] > 0
    fused = [b.attn.qkv.weight for b in out.blocks] + [b.ffn.gate_up.weight for b in out.blocks]
    assert all(w._loader is not None and not w.loaded for w in fused)
    assert not any(w.loaded for _, w in named_weights(out) if isinstance(w, Weight) and w.nbytes() >= 4096)
    torch.testing.assert_close(reference.forward(out, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", [False, True])
def test_trimming_returns_heap_or_weight_pages_while_it_runs(monkeypatch, weights):
    """trimming(): the helper thread trims the heap, or (weights=True, for a converter that reads
    each weight once, coremltools) lets the weight files' pages go, until the block ends."""
    import time

    calls = {"trim": 0, "page_out": 0}
    monkeypatch.setattr(spill_mod, "trim_heap", lambda: calls.__setitem__("trim", calls["trim"] + 1))
    monkeypatch.setattr(spill_mod, "page_out_weights", lambda: calls.__setitem__("page_out", calls["page_out"] + 1))
    with spill_mod.trimming(every_s=0.01, weights=weights):
        time.sleep(0.2)
    done = dict(calls)
    time.sleep(0.05)
    assert calls == done  # stopped with the block
    assert (done["page_out"] > 0, done["trim"] > 0) == (weights, not weights)


@pytest.mark.parametrize("src,dst", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                     (torch.float16, torch.float32)])
def test_converted_goes_to_the_file_in_pieces_and_is_exact(src, dst, monkeypatch):
    """Spill.converted writes t.float().to(dtype) a chunk at a time (here 7 elements, not a
    divisor of the size) and maps it back: the same values as the one-piece conversion."""
    t = (torch.randn(37, 53) * 3).to(src)
    sp = Spill("test")
    out = sp.converted(t, dst, chunk=7)
    assert out.dtype == dst and out.shape == t.shape and spill_mod.file_backed(out)
    assert torch.equal(out, t.float().to(dst))
    assert sp.nbytes == t.numel() * out.element_size()
    t2 = t.clone()
    t2.view(-1)[-1] += 1  # control: a change in the last piece shows
    assert not torch.equal(sp.converted(t2, dst, chunk=7), out)


def test_lowering_converts_a_bf16_checkpoint_into_scratch_space(tiny_llama_dir, monkeypatch):
    """A bf16 weight's fp32 Parameter is converted into the scratch file in pieces (Llama-3.2-1B:
    the tied table's fp32 copy was 1 GB of heap beside its bf16 source) and equals w.float()."""
    from slmc.compiler.ir import named_weights
    from slmc.compiler.lowering.module import LoweredLM

    monkeypatch.setattr(spill_mod, "MIN_BYTES", 4096)
    m = import_hf(tiny_llama_dir)
    bf = [w for _, w in named_weights(m) if isinstance(w, Weight) and w.nbytes() >= 4096]
    for w in bf:  # the checkpoint as published: bf16
        w._data, w._loader, w.dtype = w.data.to(torch.bfloat16), None, "bfloat16"
    seen = []
    real = Spill.converted
    monkeypatch.setattr(Spill, "converted", lambda self, t, dtype, chunk=1 << 22: seen.append(t.dtype) or
                        real(self, t, dtype, chunk=64))
    mod = LoweredLM(m).eval()
    assert seen and set(seen) == {torch.bfloat16}
    for w in bf:
        p = mod.ir_params[id(w)]
        assert spill_mod.file_backed(p) and p.dtype == torch.float32 and torch.equal(p, w.float())


def test_gptq_factors_an_inline_hessian_in_its_own_buffer(monkeypatch):
    """gptq(..., overwrite=True): act-order's permutation, both factorizations and the inverse
    run in the caller's H buffer (an 8192-wide H is 256 MiB), never a copy of it; a caller who
    keeps H (overwrite=False) has its H left alone and the work done on a copy."""
    from slmc.passes import quant_gptq as q

    ptrs = []
    real = q._hinv_upper

    def spy(A, damp, scratch):
        ptrs.append(A.data_ptr())
        return real(A, damp, scratch)

    monkeypatch.setattr(q, "_hinv_upper", spy)
    x = torch.randn(300, 128)
    s = QuantScheme(bits=4, group_size=32, symmetric=True)
    W = torch.randn(64, 128)
    for act_order in (True, False):
        h = x.T @ x / 300
        h0 = h.clone()
        q.gptq(W.clone(), h, s, act_order=act_order, overwrite=True)
        assert ptrs[-1] == h.data_ptr() and not torch.equal(h, h0)
        q.gptq(W.clone(), h0, s, act_order=act_order)  # control: the caller keeps its H
        assert ptrs[-1] != h0.data_ptr() and torch.equal(h0, x.T @ x / 300)


def test_gram_of_one_chunk_needs_no_fp64_matrix_and_is_the_same():
    """calib.gram below GRAM_TOKENS builds the result 512 rows at a time, each block of rows
    from its own columns of x: the same fp64 sum, division and rounding per element as the
    chunked path, signs of zero included. Equal to the whole product's rows up to the BLAS's
    order of summation (bit for bit on the BLAS this was checked with)."""
    from slmc.compiler import calib

    x = torch.randn(300, 1100)
    x[:150, 7] = -0.0
    x[:, 9] = 0.0
    p = x.T @ x
    want = (torch.zeros(p.shape, dtype=torch.float64) + p.double()).div(300).float()
    got = calib.gram(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    assert torch.equal(torch.signbit(got), torch.signbit(want)) and not got[9].any()
    x[0, 0] += 1  # control
    assert not torch.allclose(calib.gram(x), want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_spill_tree_frees_the_old_floats_without_a_garbage_collection():
    """spill_tree's recursive walk is a reference cycle holding its memo; the memo is cleared,
    so a rewritten float goes as soon as it is spilled (quant.awq at 1B held 0.4 GB of a block's
    old floats until the collector happened to run)."""
    import gc
    import weakref

    from slmc.compiler.ir import Weight
    from slmc.compiler.spill import spill_tree

    gc.disable()
    try:
        w = Weight(torch.randn(512, 1024))  # 2 MiB, no file behind it: spilled
        ref, blk = weakref.ref(w.data), [w]
        del w
        spill_tree(blk, Spill("test"))
        assert ref() is None and blk[0].shape == (512, 1024)
        kept = Weight(torch.randn(512, 1024))  # control: a float someone still holds stays
        ref = weakref.ref(kept.data)
        spill_tree([kept], Spill("test"))
        assert ref() is not None
    finally:
        gc.enable()


def test_paging_out_loads_the_c_library_once():
    """Each ctypes.CDLL is a reference cycle; page_out_weights runs after every block."""
    import ctypes
    import gc

    spill_mod.page_out_weights()
    gc.collect()
    before = sum(isinstance(o, ctypes.CDLL) for o in gc.get_objects())
    for _ in range(5):
        spill_mod.page_out_weights()
        spill_mod.let_go([])
    assert sum(isinstance(o, ctypes.CDLL) for o in gc.get_objects()) == before


def test_a_spill_copy_is_mapped_when_big_and_a_clone_when_small():
    big, small = torch.randint(-8, 8, (1024, 1024), dtype=torch.int8), torch.randn(16, 16)
    sp = Spill("test")
    cb, cs = sp.copy(big), sp.copy(small)
    assert spill_mod.file_backed(cb) and not spill_mod.file_backed(cs)
    assert torch.equal(cb, big) and torch.equal(cs, small)
    cb[0, 0] += 1  # each is a copy of its own (control: the original does not follow)
    cs[0, 0] += 1
    assert not torch.equal(cb, big) and not torch.equal(cs, small)


def test_gram_over_several_chunks_is_the_fp64_sum_of_their_products(monkeypatch):
    """Above GRAM_TOKENS, gram sums each chunk's X^T X in fp64, built 512 rows at a time."""
    from slmc.compiler import calib

    monkeypatch.setattr(calib, "GRAM_TOKENS", 128)  # 300 tokens: chunks of 128, 128, 44
    x = torch.randn(300, 1100)
    want = sum((x[i:i + 128].T @ x[i:i + 128]).double() for i in range(0, 300, 128)).div(300).float()
    got = calib.gram(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    x[299, 0] += 1  # control: the last, short chunk counts
    assert not torch.allclose(calib.gram(x), want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_converted_array_is_numpys_cast_in_pieces_and_lets_its_source_go(monkeypatch):
    """Spill.converted_array (Core ML's fp16 weights, targets/coreml/lean.py) gives numpy's own
    astype, overflow, subnormals and NaN included, as a mapped array; the pages it read from a
    mapped source are let go, and a heap source's never are (let_go would lose them)."""
    monkeypatch.setattr(spill_mod, "MIN_BYTES", 16)
    rng = np.random.default_rng(0)
    vals = np.r_[rng.normal(size=16379) * 3, [7e4, -1e-8, 6e-8, np.nan, np.inf]].astype(np.float32).reshape(128, 128)
    src = Spill("src").mapped(torch.from_numpy(vals)).numpy()  # a mapped file, as a checkpoint's weight
    gone = []
    monkeypatch.setattr(spill_mod, "let_go", lambda r: gone.extend(r))
    out = Spill("test").converted_array(src, np.float16, chunk=3000)
    assert out.dtype == np.float16 and out.shape == src.shape and spill_mod.file_backed(torch.from_numpy(out))
    assert np.array_equal(out, vals.astype(np.float16), equal_nan=True)
    lo, hi = src.__array_interface__["data"][0], src.__array_interface__["data"][0] + src.nbytes
    assert gone and all(lo <= a and a + n <= hi for a, n in gone)
    gone.clear()
    heap = Spill("test").converted_array(vals, np.float16, chunk=3000)
    assert np.array_equal(heap, out, equal_nan=True) and gone == []  # control: heap pages stay


@pytest.mark.parametrize("dst,symmetric", [(torch.float32, True), (torch.float16, False)])
def test_dequantized_goes_to_the_file_in_pieces_and_is_exact(dst, symmetric, monkeypatch):
    """Spill.dequantized writes q.float().to(dtype) a block of rows at a time (the whole image
    never on the heap) and maps it back: the same values as float()."""
    q = rtn(torch.randn(37, 64), QuantScheme(4, 32, symmetric, "float32"), "rtn")
    monkeypatch.setattr(spill_mod, "DEQUANT_CHUNK", 5 * 64)  # 5 rows a block: 37 is not a multiple
    rows = []
    real = QuantWeight.rows
    monkeypatch.setattr(QuantWeight, "rows", lambda self, idx: rows.append(idx) or real(self, idx))
    out = Spill("test").dequantized(q, dst)
    assert len(rows) == 8 and spill_mod.file_backed(out)
    assert out.dtype == dst and torch.equal(out, q.float().to(dst))
    q.codes[-1, -1] = -q.codes[-1, -1] - 1  # control: a change in the last block shows
    assert not torch.equal(Spill("test").dequantized(q, dst), out)


def test_lowering_dequantizes_into_scratch_space(tiny_llama_dir, monkeypatch):
    """A target that lowers QuantWeights as floats (dequantize=True: ONNX, LiteRT's fallback)
    gets each as Spill.dequantized's mapped image, equal to w.float()."""
    from slmc.compiler.ir import named_weights
    from slmc.compiler.lowering.module import LoweredLM, LoweringSpec

    monkeypatch.setattr(spill_mod, "MIN_BYTES", 4096)
    m = import_hf(tiny_llama_dir)
    for _, lin in block_linears(m):
        lin.weight = rtn(lin.weight.float(), QuantScheme(4, 32, True, "float32"), "rtn")
    qs = [w for _, w in named_weights(m) if isinstance(w, QuantWeight) and w.codes.numel() * 4 >= 4096]
    assert qs
    seen = []
    real = Spill.dequantized
    monkeypatch.setattr(Spill, "dequantized", lambda self, q, dtype: seen.append(id(q)) or real(self, q, dtype))
    mod = LoweredLM(m, LoweringSpec(dequantize=True)).eval()
    assert set(seen) == {id(w) for w in qs}
    for w in qs:
        p = mod.ir_params[id(w)]
        assert spill_mod.file_backed(p) and torch.equal(p, w.float())


def test_lowering_maps_a_small_projection_and_keeps_a_norm_vector():
    """A K/V projection the size of SmolLM2-135M's (192 x 576 fp32, 432 KiB: sixty of them
    stayed on the heap at a 1 MiB threshold, 25 MiB through LiteRT's conversion) is mapped from the
    scratch file with the same values; a norm vector stays on the heap."""
    import torch.nn as nn

    from slmc.compiler.lowering.layers import _Params

    params = _Params(nn.Module(), torch.float32)
    kv, norm = Weight(torch.randn(192, 576)), Weight(torch.randn(576))
    mapped, kept = params._float(kv), params._float(norm)
    assert spill_mod.file_backed(mapped) and torch.equal(mapped, kv.data)
    assert not spill_mod.file_backed(kept) and torch.equal(kept, norm.data)
