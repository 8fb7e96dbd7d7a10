"""The LiteRT artifact: LiteRT-LM's signature conventions, weights stored once, prefill
padding, the GPU-delegate fallback report, the .litertlm bundle, and refusals (exit code 2)."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from slmc import api
from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.lowering import LoweredLM, LoweringSpec
from slmc.compiler.serialize import save_ir
from slmc.errors import SlmcError
from slmc.targets.tflite.session import open_tflite
from slmc.targets import get_target
from slmc.targets.base import write_artifact
from slmc.targets.tflite.target import TFLiteSpec, npu_sdk_dir
from slmc.targets.tflite.gpu import _gpu_reason

MAX_LEN = 64


def _stdout(res):
    return getattr(res, "stdout", res.output)


@pytest.fixture(scope="module")
def artifact(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfl") / "tiny-tflite"
    res = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-t", "tflite", "-o", str(out),
                                    "--max-seq-len", str(MAX_LEN), "--json"])
    assert res.exit_code == 0, res.output
    json.loads(_stdout(res))  # conversion logs must not leak into --json output
    return out


@pytest.fixture(scope="module")
def manifest(artifact):
    return json.loads((artifact / "manifest.json").read_text())


def test_two_signatures_with_litert_lm_names(artifact, manifest):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(artifact / "model.tflite"))
    sigs = it.get_signature_list()
    assert set(sigs) == {"prefill", "decode"}
    caches = {f"kv_cache_{c}_{d}" for d in range(2) for c in "kv"}
    P = MAX_LEN - 1
    assert manifest["prefill_len"] == P
    for name, T in (("prefill", P), ("decode", 1)):
        r = it.get_signature_runner(name)
        ins, outs = r.get_input_details(), r.get_output_details()
        assert set(ins) == {"tokens", "input_pos"} | caches
        assert set(outs) == caches | ({"logits"} if name == "decode" else set())
        assert ins["tokens"]["shape"].tolist() == [1, T] and ins["tokens"]["dtype"] == np.int32
        assert ins["input_pos"]["shape"].tolist() == [T] and ins["input_pos"]["dtype"] == np.int32
        for c in caches:  # BHSD (the IR default), values by column, fp32, returned under the same name
            shape = [1, 2, 16, MAX_LEN] if c.startswith("kv_cache_v") else [1, 2, MAX_LEN, 16]
            assert ins[c]["shape"].tolist() == shape and ins[c]["dtype"] == np.float32
            assert outs[c]["shape"].tolist() == ins[c]["shape"].tolist()
    assert it.get_signature_runner("decode").get_output_details()["logits"]["shape"].tolist() == [1, 1, 256]
    assert manifest["kv_cache"]["v_axes"] == "[1, kv_heads, head_dim, max_len]"
    # the manifest records what the interpreter sees
    io = manifest["io"]
    assert [i["name"] for i in io["prefill"]["inputs"]][:2] == ["tokens", "input_pos"]
    assert io["decode"]["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": [1, 1, 256]}
    assert manifest["kv_cache"]["layout"] == "bhsd" and manifest["format"] == "tflite"


def test_weights_stored_once(artifact, manifest):
    """Both signatures share one copy of the weights: the file is ~1x the fp32 weights, not 2x."""
    fp32 = manifest["model"]["params"] * 4
    size = (artifact / "model.tflite").stat().st_size
    assert fp32 < size < 1.5 * fp32, (size, fp32)


def test_gpu_fallback_report_lists_real_ops(artifact, manifest):
    from ai_edge_litert import _pywrap_analyzer_wrapper as analyzer

    rep = manifest["gpu_delegate_fallback"]
    assert "gpu_compatibility.cc" in rep["method"]
    dump = analyzer.ModelAnalyzer(str(artifact / "model.tflite"), True, False)
    # ops per signature subgraph, from the analyzer's own dump of the flatbuffer
    parts = re.split(r"\nSubgraph#\d+ ", dump)
    ops = {p.split("(")[0]: re.findall(r"Op#\d+ (\w+)\(", p.split("\nTensors of")[0]) for p in parts[1:]}
    for sig in ("prefill", "decode"):
        s = rep["signatures"][sig]
        assert s["ops"] == len(ops[sig])
        assert s["fallback_ops"] == sum(e["count"] for e in s["fallback"].values()) <= s["ops"]
        for op, e in s["fallback"].items():
            assert ops[sig].count(op) >= e["count"] and e["reasons"]


def test_gpu_rules():
    f32 = ("FLOAT32", 3, False)
    assert _gpu_reason("FULLY_CONNECTED", [f32, ("FLOAT32", 2, True)], [f32]) is None
    assert _gpu_reason("GATHER_ND", [f32, ("INT32", 2, False)], [f32]) == "op not supported by the GPU delegate"
    assert "rank-1" in _gpu_reason("SLICE", [("INT32", 1, False), ("INT32", 1, True)], [("INT32", 1, False)])
    assert _gpu_reason("CAST", [("INT64", 1, False)], [f32]) == "CAST INT64 -> FLOAT32"
    assert _gpu_reason("SOFTMAX", [f32], [f32]) is None


def test_litertlm_bundle_holds_model_and_tokenizer(artifact, manifest, tmp_path):
    from litert_lm_builder import litertlm_builder

    assert manifest["litertlm"]["file"] == "model.litertlm"
    meta = manifest["litertlm"]["llm_metadata"]
    # the ASCII test tokenizer adds no BOS, so no start token is declared for the runtime to add
    assert meta["max_num_tokens"] == MAX_LEN and meta["stop_tokens"] == [2] and meta["start_token"] is None
    assert manifest["files"]["model.litertlm"] == (artifact / "model.litertlm").stat().st_size
    litertlm_builder.unpack(str(artifact / "model.litertlm"), str(tmp_path))
    dumped = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    model = (artifact / "model.tflite").read_bytes()
    assert any(data == model for data in dumped.values()), sorted(dumped)
    assert "tokenizer" in (tmp_path / "model.toml").read_text().lower()


def test_validate_cli_passes(artifact):
    res = CliRunner().invoke(main, ["validate", str(artifact), "--steps", "8", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(_stdout(res)[_stdout(res).index("{"):])
    assert report["passed"] and report["runtime"] == "ai_edge_litert" and report["prefill_max_abs"] < 1e-3


@pytest.fixture(scope="module")
def chunked(tiny_llama_dir, tmp_path_factory):
    """A 12-token prefill over a BSHD cache: prompts span several chunks, the last one padded."""
    m = api.load(tiny_llama_dir, max_seq_len=MAX_LEN)
    m.kv.layout = "bshd"
    spec = TFLiteSpec(prefill_len=12, bundle=False)
    tgt = get_target("tflite")
    assert tgt.supports(m, spec) is None
    out = write_artifact(tgt.lower(m, spec), tmp_path_factory.mktemp("tfl12") / "a", None)
    return m, out, json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("n", [5, 30, 62])  # one padded chunk; 2 full + 1 padded; tail near the end
def test_prefill_padding_matches_reference(chunked, n):
    m, out, manifest = chunked
    assert manifest["kv_cache"]["layout"] == "bshd" and manifest["prefill_len"] == 12
    ids = torch.randint(0, m.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    session = open_tflite(out, manifest)
    got = session.step(ids, 0)
    ref = reference.forward(m, torch.tensor([ids]))[0, -1]
    assert float((got - ref).abs().max()) < 2e-3
    # the cache holds exactly the unpadded run's K/V at every real position (slot 0 included:
    # LiteRT-LM gives padded rows position 0, which must not be written there)
    lm = LoweredLM(m, LoweringSpec(kv="io", positions="start")).eval()
    with torch.no_grad():
        eager = lm(torch.tensor([ids]), torch.tensor([0]), *lm.empty_caches())[1:]
    for d in range(m.n_layers):
        for j, c in enumerate("kv"):
            cache = torch.from_numpy(session.caches[f"kv_cache_{c}_{d}"])
            assert cache.shape == (1, MAX_LEN, 2, 16)
            assert torch.allclose(cache[:, :n], eager[2 * d + j][:, :n], atol=1e-4)
    # and decoding continues from there
    nxt = int(got.argmax())
    if n + 1 < MAX_LEN:
        got2 = session.step([nxt], n)
        ref2 = reference.forward(m, torch.tensor([ids + [nxt]]))[0, -1]
        assert float((got2 - ref2).abs().max()) < 2e-3


def test_session_refuses_overflow(chunked):
    _, out, manifest = chunked
    with pytest.raises(SlmcError, match="exceed the KV cache"):
        open_tflite(out, manifest).step([1] * (MAX_LEN + 1), 0)


def test_prefill_length_must_fit(tiny_llama_dir):
    m = api.load(tiny_llama_dir, max_seq_len=MAX_LEN)
    assert "prefill length 64" in get_target("tflite").supports(m, TFLiteSpec(prefill_len=MAX_LEN))


@pytest.mark.parametrize("backend,pip_name,env", [("qualcomm", "ai-edge-litert-sdk-qualcomm", "QNN_SDK_ROOT"),
                                                  ("mediatek", "ai-edge-litert-sdk-mediatek", "LD_LIBRARY_PATH")])
def test_npu_backend_without_sdk_is_refused(tiny_llama_dir, tmp_path, backend, pip_name, env):
    if npu_sdk_dir(backend)[0] is not None:
        pytest.skip(f"the {backend} SDK is installed here, so the compile is not refused")
    out = tmp_path / "npu"
    res = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-t", "tflite", "-b", backend, "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert pip_name in res.output and env in res.output and "not found" in res.output
    assert not out.exists()


@pytest.mark.parametrize("backend", ["qualcomm", "mediatek"])
def test_npu_compile_with_sdk(tiny_llama_dir, tmp_path, backend):
    if npu_sdk_dir(backend)[0] is None:
        pytest.skip(f"needs the {backend} NPU SDK (see the refusal message); not installable offline")
    m = api.load(tiny_llama_dir, max_seq_len=MAX_LEN)
    soc = {"qualcomm": "SM8650", "mediatek": "MT6989"}[backend]
    art = get_target("tflite").lower(m, TFLiteSpec(backend=backend, soc_model=soc))
    assert art.manifest["npu"]["soc_model"] == soc and all(n.endswith(".tflite") for n in art.files)


@pytest.mark.parametrize("change,word", [({"arena": True}, "arena")])  # fp16/int8/ring: test_kv_cache.py
def test_unsupported_kv_spec_exits_2(tiny_llama_dir, tmp_path, change, word):
    m = api.load(tiny_llama_dir, max_seq_len=MAX_LEN)
    for k, v in change.items():
        setattr(m.kv, k, v)
    save_ir(m, tmp_path / "ir")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compile", str(tmp_path / "ir"), "-t", "tflite", "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert word in res.output and "KV cache" in res.output
    assert not out.exists()
