"""quant.rotate: Hadamard constructions, exactness in float on every family it accepts (fused
projections, biases, unit-offset norms, shared blocks and FFNs, tied heads), the controls
that show the checks can fail, each refusal, and composition with the quantization passes."""

import copy

import pytest
import torch

from tiny import save_hf_model

from slmc.compiler import reference
from slmc.compiler.families import FAMILIES, load_all
from slmc.compiler.hadamard import hadamard, rotation
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.ir import Linear, Weight, named_weights
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.errors import SlmcError
from slmc.passes.quant_rotate import fold_norms, rotate_stream

load_all()
TOL = 1e-4
REFUSED = ("gemma2", "gemma3")  # post-attention / post-FFN norms
ALLOWED = sorted(n for n in FAMILIES if n not in REFUSED)


def _import(name, tmp_path, **cfg_changes):
    cfg = FAMILIES[name].tiny_config()
    cfg.update(cfg_changes)
    save_hf_model(cfg, tmp_path)
    return import_hf(tmp_path)


def _ids(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 20), generator=g)


def _run(m, *specs):
    return PassManager([parse_pass(s) for s in specs]).run(m)


def _err(a, b):
    return (a - b).abs().max().item()


def _snapshot(m):
    return {p: w.data.clone() for p, w in named_weights(m)}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from slmc.compiler.families.llama import tiny_config

    d = tmp_path_factory.mktemp("rot-llama")
    save_hf_model(tiny_config(), d)
    return d


@pytest.fixture
def llama(llama_dir):
    return import_hf(llama_dir)


# ---------------------------------------------------------------- matrices

@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 64, 72, 576])
def test_hadamard_constructions(n):
    h, how = hadamard(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)), how
    if n >= 4 and n & (n - 1) == 0:
        assert how.startswith("sylvester")


def test_sizes_without_a_construction_fall_back_to_random_orthogonal():
    assert hadamard(6) is None and hadamard(52) is None  # 52 would need Paley II over GF(25)
    gen = torch.Generator().manual_seed(0)
    for n in (6, 52):
        r, how = rotation(n, "hadamard", gen)
        assert how == "random"
        assert _err(r @ r.T, torch.eye(n, dtype=torch.float64)) < 1e-12
    r, how = rotation(576, "hadamard", gen)
    assert how.startswith("hadamard") and _err(r @ r.T, torch.eye(576, dtype=torch.float64)) < 1e-12
    assert torch.allclose(r.abs(), torch.full_like(r, 576 ** -0.5))  # spreads every coordinate evenly
    a, _ = rotation(64, "random", torch.Generator().manual_seed(1))
    b, _ = rotation(64, "random", torch.Generator().manual_seed(2))
    assert _err(a, b) > 0.1, "the seed must choose the matrix"


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("name", ALLOWED)
def test_rotation_keeps_logits_on_every_accepted_family(name, tmp_path):
    m = _import(name, tmp_path)
    ids = _ids(m.vocab_size)
    want = reference.forward(m, ids)
    q0 = copy.deepcopy(m.blocks[0].attn)
    spec = "quant.rotate:untie=true" if m.lm_head is None else "quant.rotate"
    m, logs = _run(m, spec)
    got = reference.forward(m, ids)
    assert want.abs().max() > 0.1
    assert _err(got, want) <= TOL, f"{name}: {_err(got, want):.3g}"
    a = m.blocks[0].attn
    for old, new in ((q0.qkv or q0.q, a.qkv or a.q), (q0.o, a.o)):
        assert _err(old.weight.data, new.weight.data) > 0.05, "the weights must actually be rotated"
    assert logs[0].info["r1"].startswith("hadamard")
    assert all(torch.equal(n.weight.data, torch.ones_like(n.weight.data))
               for b in m.blocks for n in (b.attn_norm, b.ffn_norm))


@pytest.mark.parametrize("spec", ["quant.rotate:kind=random,seed=3", "quant.rotate:heads=false"])
def test_random_kind_and_r1_only_are_exact(tmp_path, spec):
    m = _import("mistral", tmp_path)  # head_dim 24: a Paley Hadamard for R2
    ids = _ids(m.vocab_size)
    want = reference.forward(m, ids)
    m, logs = _run(m, spec)
    assert _err(reference.forward(m, ids), want) <= TOL
    assert ("r2_24" in logs[0].info) == ("heads=false" not in spec)


def test_fused_projections_with_biases(tmp_path):
    """Qwen2's q/k/v biases inside a fused qkv (v's bias rotates with R2), an o bias and a
    down bias (rotated with R1), fused gate_up."""
    m = _import("qwen2", tmp_path)
    g = torch.Generator().manual_seed(5)
    for b in m.blocks:
        b.attn.o.bias = Weight(torch.randn(m.hidden_size, generator=g))
        b.ffn.down.bias = Weight(torch.randn(m.hidden_size, generator=g))
    m, _ = _run(m, "canon.fuse_projections")
    assert m.blocks[0].attn.fused and m.blocks[0].ffn.fused and m.blocks[0].attn.qkv.bias is not None
    ids = _ids(m.vocab_size)
    want = reference.forward(m, ids)
    m, _ = _run(m, "quant.rotate")
    assert _err(reference.forward(m, ids), want) <= TOL


def test_unit_offset_norms_fold(llama, tmp_path):
    """Gemma stores w - 1; folding must use w (a Llama rewritten that way computes the same)."""
    ids = _ids(llama.vocab_size)
    want = reference.forward(llama, ids)
    norms = [b.attn_norm for b in llama.blocks] + [b.ffn_norm for b in llama.blocks] + [llama.final_norm]
    for n in norms:
        n.weight, n.unit_offset = Weight(n.weight.data - 1.0), True
    assert _err(reference.forward(llama, ids), want) <= TOL
    m, _ = _run(llama, "quant.rotate:untie=true")
    assert _err(reference.forward(m, ids), want) <= TOL
    assert all(not n.weight.data.any() for n in norms), "a unit-offset norm's unit scale is stored as 0"


def test_tied_head_stays_tied_with_a_uniform_final_norm(llama):
    llama.final_norm.weight = Weight(torch.full((llama.hidden_size,), 0.7))
    ids = _ids(llama.vocab_size)
    want = reference.forward(llama, ids)
    before = llama.embed.data.clone()
    m, logs = _run(llama, "quant.rotate")
    assert m.lm_head is None and not logs[0].info["untied_head"]
    assert _err(m.embed.data, before) > 0.05
    assert _err(reference.forward(m, ids), want) <= TOL


def test_untie_gives_the_head_its_own_table(llama):
    ids = _ids(llama.vocab_size)
    want = reference.forward(llama, ids)
    m, logs = _run(llama, "quant.rotate:untie=true")
    assert m.lm_head is not None and m.lm_head.weight is not m.embed and logs[0].info["untied_head"]
    assert _err(reference.forward(m, ids), want) <= TOL


def test_shared_blocks_and_ffns_are_rotated_once(llama):
    """Block 0 runs at depths 0 and 2; block 1's FFN object is block 0's (equal ffn norms)."""
    llama.layers = [0, 1, 0]
    llama.blocks[1].ffn = llama.blocks[0].ffn
    llama.blocks[1].ffn_norm.weight = Weight(llama.blocks[0].ffn_norm.weight.data.clone())
    ids = _ids(llama.vocab_size)
    want = reference.forward(llama, ids)
    m, _ = _run(llama, "quant.rotate:untie=true")
    assert m.blocks[1].ffn is m.blocks[0].ffn and m.layers == [0, 1, 0]
    assert _err(reference.forward(m, ids), want) <= TOL


def test_fold_only_is_exact_and_rotates_nothing(llama):
    """rotate=false: the norm scales move into the linears reading them (W diag(w), the head
    untied as E diag(w_final)) and nothing else changes: no R1 on the embedding or on what
    writes the stream, no R2 on the heads."""
    ids = _ids(llama.vocab_size)
    want = reference.forward(llama, ids)
    b = llama.blocks[0]
    before = _snapshot(llama)
    w_attn, w_final = b.attn_norm.weight.data.double(), llama.final_norm.weight.data.double()
    m, logs = _run(llama, "quant.rotate:rotate=false,untie=true")
    assert _err(reference.forward(m, ids), want) <= TOL
    after = _snapshot(m)
    for p in ("embed", "blocks.0.attn.o.weight", "blocks.0.ffn.down.weight", "blocks.1.attn.o.weight"):
        assert torch.equal(after[p], before[p]), f"{p} must not be rotated"
    assert torch.equal(m.blocks[0].attn.q.weight.data, (before["blocks.0.attn.q.weight"].double() * w_attn).float())
    assert torch.equal(m.blocks[0].attn.v.weight.data, (before["blocks.0.attn.v.weight"].double() * w_attn).float())
    assert m.lm_head is not None and m.lm_head.weight is not m.embed
    assert torch.equal(m.lm_head.weight.data, (before["embed"].double() * w_final).float())
    assert logs[0].info["untied_head"] and "r1" not in logs[0].info
    assert all(torch.equal(n.weight.data, torch.ones_like(n.weight.data))
               for b in m.blocks for n in (b.attn_norm, b.ffn_norm))


@pytest.mark.parametrize("name", REFUSED)
def test_fold_only_accepts_post_norm_families(name, tmp_path):
    """Gemma 2/3's post norms only stop the rotation; folding the pre-norms stays exact."""
    m = _import(name, tmp_path)
    ids = _ids(m.vocab_size)
    want = reference.forward(m, ids)
    m, _ = _run(m, "quant.rotate:rotate=false,untie=true")
    assert _err(reference.forward(m, ids), want) <= TOL


# ---------------------------------------------------------------- controls

def test_control_rotating_without_folding_the_norms_breaks_the_logits(llama):
    ids = _ids(llama.vocab_size)
    want = reference.forward(llama, ids)
    folded = copy.deepcopy(llama)
    fold_norms(folded)
    assert _err(reference.forward(folded, ids), want) <= TOL  # folding alone is exact
    r, _ = rotation(llama.hidden_size, "hadamard", torch.Generator().manual_seed(0))
    llama.lm_head = Linear(Weight(llama.embed.data.clone()))  # untied, so only the norms differ
    rotate_stream(llama, r)
    assert _err(reference.forward(llama, ids), want) > 0.05


def test_control_a_wrong_head_rotation_breaks_the_logits(llama):
    """R2 on v without the matching o columns is not exact: the head check can fail."""
    from slmc.passes.quant_rotate import rotate_heads

    ids = _ids(llama.vocab_size)
    want = reference.forward(llama, ids)
    a = llama.blocks[0].attn
    o = a.o.weight
    rotate_heads(llama, {a.head_dim: rotation(a.head_dim, "random", torch.Generator().manual_seed(0))[0]})
    a.o.weight = o
    assert _err(reference.forward(llama, ids), want) > 0.05


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("name", REFUSED)
def test_post_norm_families_are_refused(name, tmp_path):
    m = _import(name, tmp_path)
    before = _snapshot(m)
    with pytest.raises(SlmcError, match="post_attn_norm.*does not commute") as e:
        _run(m, "quant.rotate:untie=true")
    assert "\n" not in str(e.value)
    after = _snapshot(m)
    assert all(torch.equal(before[p], after[p]) for p in before), "a refusal leaves the IR as it was"


def test_quantized_weights_are_refused(llama):
    m, _ = _run(llama, "quant.rtn:bits=4,group_size=32")
    with pytest.raises(SlmcError, match="(float_weights).*already quantized; run quant.rotate before") as e:
        _run(m, "quant.rotate:untie=true")
    assert "\n" not in str(e.value)


def test_tied_head_with_a_non_uniform_final_norm_is_refused(llama):
    with pytest.raises(SlmcError, match="tied to the output head.*untie=true"):
        _run(llama, "quant.rotate")


def test_shared_ffn_under_different_norms_is_refused(llama):
    llama.blocks[1].ffn = llama.blocks[0].ffn  # block 1 keeps its own, different ffn_norm
    with pytest.raises(SlmcError, match="shared with blocks.0 reads norms with different scales"):
        _run(llama, "quant.rotate:untie=true")


def test_bad_options_are_refused():
    with pytest.raises(SlmcError, match="kind 'givens'"):
        parse_pass("quant.rotate:kind=givens")


# ---------------------------------------------------------------- composition

def test_rotate_then_rtn_int4_runs(llama):
    ids = _ids(llama.vocab_size)
    m, logs = _run(llama, "quant.rotate:untie=true", "quant.rtn:bits=4,group_size=32")
    assert logs[1].info["quantized"] > 0
    out = reference.forward(m, ids)
    assert torch.isfinite(out).all() and out.abs().max() > 0.1


def test_rotation_spreads_outlier_weights_for_rtn(llama):
    """Sparse large entries in what reads the stream (1 % of q/k/v/gate/up weights 10x larger)
    ruin their int4 groups; the rotation spreads each over its whole row (incoherence), so
    int4 RTN loses much less after it."""
    g = torch.Generator().manual_seed(7)
    for b in llama.blocks:
        for lin in (b.attn.q, b.attn.k, b.attn.v, b.ffn.gate, b.ffn.up):
            w = lin.weight.data
            spikes = (torch.rand(w.shape, generator=g) < 0.01) * torch.randn(w.shape, generator=g) * 5
            lin.weight = Weight(w + spikes)
    ids = _ids(llama.vocab_size)
    want = reference.forward(llama, ids)
    plain, _ = _run(copy.deepcopy(llama), "quant.rtn:bits=4,group_size=32")
    rot, _ = _run(llama, "quant.rotate:untie=true", "quant.rtn:bits=4,group_size=32")
    e_plain = (reference.forward(plain, ids) - want).pow(2).mean().item()
    e_rot = (reference.forward(rot, ids) - want).pow(2).mean().item()
    assert e_rot < 0.6 * e_plain, (e_rot, e_plain)


@pytest.mark.parametrize("quant", ["quant.gptq:bits=4,group_size=32,n_seqs=2,seq_len=16",
                                   "quant.awq:bits=4,group_size=32,n_seqs=2,seq_len=16"])
def test_rotate_composes_before_gptq_and_awq(llama, quant):
    ids = _ids(llama.vocab_size)
    m, logs = _run(llama, "quant.rotate:untie=true", quant)
    assert logs[1].modified
    out = reference.forward(m, ids)
    assert torch.isfinite(out).all() and out.abs().max() > 0.1


def test_rotated_model_lowers_unchanged(llama_dir):
    """No new ops: the shared lowering runs the rotated IR (prefill + decode with its KV cache)
    and matches the original model's reference logits."""
    from test_lowering import _run as run_lowered

    from slmc.compiler.lowering.module import LoweredLM, LoweringSpec

    m = import_hf(llama_dir, max_seq_len=40)
    ids = _ids(m.vocab_size)[:1]
    want = reference.forward(m, ids)[0]
    m, _ = _run(m, "quant.rotate:untie=true")
    spec = LoweringSpec()
    outs = run_lowered(LoweredLM(m, spec).eval(), ids, 10, spec)
    assert max(_err(a, b) for a, b in zip(outs, [want[9]] + [want[t] for t in range(10, 20)])) <= TOL
