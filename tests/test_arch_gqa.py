"""arch.gqa: identities, exact merges of duplicate heads, refit vs mean pooling, bad input,
and converted artifacts validating on every target."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from slmc import api
from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.families import FAMILIES, load_all
from slmc.compiler.importers.hf import import_hf
from slmc.compiler.pass_manager import PassManager, parse_pass
from slmc.compiler.verify import verify
from slmc.passes.arch_gqa import balanced_groups, kv_bytes_per_token

load_all()
CALIB = "n_seqs=8,seq_len=32"
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
        "surrounding families, that he is considered the rightful property of some one or other of "
        "their daughters. ") * 6

HELD_OUT = ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
            "seemed to unite some of the best blessings of existence.")


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """make(family, n_kv_heads) -> a tiny random HF folder with an ASCII tokenizer (cached)."""
    from tiny import save_ascii_tokenizer, save_hf_model

    made = {}

    def get(family: str, kv: int | None = None):
        key = (family, kv)
        if key not in made:
            cfg = FAMILIES[family].tiny_config()
            if kv is not None:
                cfg["num_key_value_heads"] = kv
            d = tmp_path_factory.mktemp(f"{family}-kv{kv}")
            save_hf_model(cfg, d)
            save_ascii_tokenizer(d, cfg["vocab_size"])
            made[key] = d
        return made[key]

    return get


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


def _ids(m, n=20):
    return torch.randint(0, m.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))


def _text_ids(folder, text):
    from tokenizers import Tokenizer

    return torch.tensor([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids[:60]])


def _run(m, spec):
    return PassManager([parse_pass(spec)]).run(m)


@pytest.mark.parametrize("kv,G", [(4, 4), (2, 2)], ids=["mha-all-heads", "gqa-own-groups"])
@pytest.mark.parametrize("method", ["mean", "similarity"])
def test_same_group_count_is_identity(make, kv, G, method):
    m = import_hf(make("llama", kv), max_seq_len=32)
    ids = _ids(m)
    before = reference.forward(m, ids)
    out, logs = _run(m, f"arch.gqa:kv_groups={G},method={method}")
    assert not logs[0].modified
    assert torch.equal(reference.forward(out, ids), before)
    kv_bytes = logs[0].info["kv_cache_bytes_per_token"]
    assert kv_bytes["before"] == kv_bytes["after"] == 2 * 2 * kv * 16 * 4  # layers x K,V x heads x dim x f32


def _duplicate_heads(m, pairs, noise=0.0):
    """Make MHA KV head j a copy of head i (plus noise) for each (i, j): a hidden GQA model."""
    g = torch.Generator().manual_seed(3)
    for b in m.blocks:
        a = b.attn
        for lin in (a.k, a.v):
            w = lin.weight.data.view(a.n_kv_heads, a.head_dim, -1)
            for i, j in pairs:
                w[j] = w[i] + noise * torch.randn(w[i].shape, generator=g)
    return m


@pytest.mark.parametrize("refit", [False, True])
def test_similarity_finds_hidden_groups_and_merges_them_exactly(make, text, refit):
    """Heads 0/2 and 1/3 carry the same K/V: similarity grouping must pair them (permuting
    Q rows and O columns), and then the merge loses nothing, refit or not."""
    m = _duplicate_heads(import_hf(make("llama", 4), max_seq_len=32), [(0, 2), (1, 3)])
    ids = _ids(m)
    before = reference.forward(m, ids)
    out, logs = _run(m, f"arch.gqa:kv_groups=2,refit={refit},calib={text},{CALIB}")
    info = logs[0].info
    assert info["groups"] == {"0": [[0, 2], [1, 3]], "1": [[0, 2], [1, 3]]}
    assert info["calib_error_mean_pool"] < 1e-10 and info["calib_error"] < 1e-10
    assert all(b.attn.n_kv_heads == 2 for b in out.blocks)
    assert torch.allclose(reference.forward(out, ids), before, atol=1e-5)
    # contiguous mean pooling merges the wrong heads
    m2 = _duplicate_heads(import_hf(make("llama", 4), max_seq_len=32), [(0, 2), (1, 3)])
    out2, logs2 = _run(m2, f"arch.gqa:kv_groups=2,method=mean,refit=false,calib={text},{CALIB}")
    assert logs2[0].info["calib_error"] > 1e-3
    assert float((reference.forward(out2, ids) - before).abs().max()) > 1e-2


def test_similarity_beats_mean_on_clustered_heads(make, text):
    errs = {}
    for method in ("mean", "similarity"):
        m = _duplicate_heads(import_hf(make("llama", 4), max_seq_len=32), [(0, 2), (1, 3)], noise=0.05)
        _, logs = _run(m, f"arch.gqa:kv_groups=2,method={method},refit=false,calib={text},{CALIB}")
        errs[method] = logs[0].info["calib_error"]
    assert errs["similarity"] < errs["mean"] / 10


@pytest.mark.parametrize("family,kv,G", [
    ("llama", 4, 1), ("llama", 4, 2), ("llama", 2, 1),
    ("qwen2", None, 1),  # k/v biases, sliding window
    ("qwen3", None, 1),  # k_norm (K keeps the mean pool), head_dim != hidden / heads
    ("phi3", None, 1),  # fused qkv, partial rotary
    ("gemma2", None, 1),  # logit soft-capping, sandwich norms
])
def test_refit_lowers_calibration_error(make, text, family, kv, G):
    m = import_hf(make(family, kv), max_seq_len=64)
    m_orig = import_hf(make(family, kv), max_seq_len=64)
    H, K = m.blocks[0].attn.n_heads, m.blocks[0].attn.n_kv_heads
    fused = m.blocks[0].attn.fused
    bytes_before = kv_bytes_per_token(m)
    out, logs = _run(m, f"arch.gqa:kv_groups={G},calib={text},{CALIB}")
    info = logs[0].info
    verify(out, "after arch.gqa")
    assert all(b.attn.n_kv_heads == G and b.attn.n_heads == H and b.attn.fused == fused for b in out.blocks)
    assert info["kv_cache_bytes_per_token"] == {"before": bytes_before, "after": bytes_before * G // K}
    assert info["layers_refit"] == info["layers_converted"] == len(out.blocks)
    assert info["calib_error"] < info["calib_error_mean_pool"]
    # the refit model is also closer to the original than mean pooling on held-out text
    mean_model, _ = _run(import_hf(make(family, kv), max_seq_len=64),
                         f"arch.gqa:kv_groups={G},method=mean,refit=false")
    held = _text_ids(make(family, kv), HELD_OUT)
    ref = reference.forward(m_orig, held)
    d_refit = (reference.forward(out, held) - ref).pow(2).mean()
    d_mean = (reference.forward(mean_model, held) - ref).pow(2).mean()
    assert d_refit < d_mean


def test_balanced_groups_recover_shuffled_clusters():
    torch.manual_seed(0)
    H, G = 12, 3
    label = torch.randperm(H) % G
    sim = (label[:, None] == label[None, :]).float() * 0.8 + 0.1 * torch.rand(H, H)
    sim = (sim + sim.T) / 2
    groups = balanced_groups(sim, G)
    assert sorted(h for g in groups for h in g) == list(range(H))
    assert all(len(g) == H // G for g in groups)
    assert all(len({int(label[h]) for h in g}) == 1 for g in groups)


def _expect_exit_2(args, *words):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("slmc: error:"), err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("spec,words", [
    ("arch.gqa:kv_groups=3", ("kv_groups=3", "does not divide", "4 query heads")),
    ("arch.gqa:kv_groups=4", ("kv_groups=4", "more than the 2 KV heads")),
    ("arch.gqa:kv_groups=0", ("kv_groups must be >= 1",)),
    ("arch.gqa", ("kv_groups must be >= 1",)),
    ("arch.gqa:kv_groups=1,method=kmeans", ("method 'kmeans'", "similarity")),
])
def test_bad_kv_groups_exit_2(make, tmp_path, spec, words):
    out = tmp_path / "out"
    _expect_exit_2(["compile", make("llama"), "-o", out, "--max-seq-len", "32", "--pass", spec],
                   "--pass arch.gqa", *words)
    assert not out.exists()


def test_quantized_attention_is_refused(make):
    m = import_hf(make("llama"), max_seq_len=32)
    m, _ = _run(m, "quant.rtn:bits=8,group_size=16")
    from slmc.errors import SlmcError

    with pytest.raises(SlmcError, match="run arch.gqa before quantization"):
        _run(m, "arch.gqa:kv_groups=1")


TARGET_FLOWS = [("executorch", "xnnpack"), ("tflite", "cpu"), ("coreml", "cpu:precision=fp32,kv=io")]


@pytest.mark.parametrize("target,backend", TARGET_FLOWS, ids=[t for t, _ in TARGET_FLOWS])
def test_converted_artifact_validates(make, text, tmp_path, target, backend):
    spec = f"arch.gqa:kv_groups=1,calib={text},{CALIB}"
    out, manifest = api.compile_model(make("llama"), target, backend, tmp_path / "out", passes=[spec],
                                      max_seq_len=48)
    log = manifest["pipeline"][0]
    assert log["name"] == "arch.gqa" and log["info"]["kv_cache_reduction"] == 2.0
    report = api.validate_artifact(out, steps=16)  # replays the pass from the manifest
    assert report.passed, report.to_json()
    assert report.greedy_equal
