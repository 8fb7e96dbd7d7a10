"""The ONNX Runtime artifact: onnxruntime-genai's decoder names and fixed-size past/present
caches, validation in onnxruntime, greedy text in onnxruntime-genai's generator, byte-identical
recompiles, a perturbed initializer caught by `validate`, and refusals (exit code 2); slmc's
int4/int8 codes as MatMulNBits/GatherBlockQuantized, validated and read back byte for byte."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import slmc
from slmc import api
from slmc.cli import main
from slmc.compiler import reference
from slmc.compiler.families import FAMILIES
from slmc.compiler.families import load_all as load_families
from slmc.targets import get_target
from slmc.targets.base import write_artifact
from slmc.targets.bounds import FLOAT_EXACT

MAX_LEN = 64
PROMPT = [5, 7, 9, 11, 13, 17]


def _stdout(res):
    return getattr(res, "stdout", res.output)


def _compile(src, out, *extra):
    res = CliRunner().invoke(main, ["compile", str(src), "-t", "onnx", "-o", str(out),
                                    "--max-seq-len", str(MAX_LEN), "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(_stdout(res))  # exporter logs must not leak into --json output


@pytest.fixture(scope="module")
def artifact(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    _compile(tiny_llama_dir, out)
    return out


@pytest.fixture(scope="module")
def manifest(artifact):
    return json.loads((artifact / "manifest.json").read_text())


@pytest.fixture(scope="module")
def gemma2_artifact(tmp_path_factory):
    """Soft-capping, per-layer sliding windows (8 positions) and sandwich norms."""
    from tiny import save_ascii_tokenizer, save_hf_model

    load_families()
    src = tmp_path_factory.mktemp("gemma2-src")
    save_hf_model(FAMILIES["gemma2"].tiny_config(), src)
    save_ascii_tokenizer(src, FAMILIES["gemma2"].tiny_config()["vocab_size"])
    out = tmp_path_factory.mktemp("onnx-gemma2") / "a"
    _compile(src, out)
    return out


def test_genai_names_and_fixed_size_caches(artifact, manifest):
    import onnxruntime as ort

    s = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in s.get_inputs()}
    outs = {o.name: o for o in s.get_outputs()}
    past = {f"past_key_values.{d}.{c}" for d in range(2) for c in ("key", "value")}
    assert set(ins) == {"input_ids", "position_ids"} | past
    assert set(outs) == {"logits"} | {n.replace("past_key_values", "present") for n in past}
    assert ins["input_ids"].shape == ins["position_ids"].shape == [1, "sequence_length"]
    assert ins["input_ids"].type == ins["position_ids"].type == "tensor(int64)"
    for n in past:  # [batch, kv_heads, max_len, head_dim], present the same shape as past
        assert ins[n].shape == [1, 2, MAX_LEN, 16] and ins[n].type == "tensor(float)"
        assert outs[n.replace("past_key_values", "present")].shape == [1, 2, MAX_LEN, 16]
    assert outs["logits"].shape == [1, "sequence_length", 256]
    import onnx

    assert max(o.version for o in onnx.load(str(artifact / "model.onnx")).opset_import if o.domain == "") >= 17
    assert manifest["format"] == "onnx" and manifest["artifact"] == "model.onnx"
    assert manifest["external_data"] is None and "model.onnx.data" not in manifest["files"]
    assert [i["name"] for i in manifest["io"]["inputs"]][:2] == ["input_ids", "position_ids"]
    assert manifest["kv_cache"]["past_present_share_buffer"] and manifest["kv_cache"]["max_len"] == MAX_LEN
    assert manifest["execution_provider"]["ort_name"] == "CPUExecutionProvider"
    assert manifest["tokenizer"]["files"][0] == "tokenizer.json"


def test_genai_config(artifact, manifest):
    cfg = json.loads((artifact / "genai_config.json").read_text())
    m, d = cfg["model"], cfg["model"]["decoder"]
    assert m["type"] == "llama" and m["context_length"] == MAX_LEN and m["vocab_size"] == 256
    assert m["eos_token_id"] == manifest["model"]["eos_ids"]
    assert d["filename"] == "model.onnx" and d["num_hidden_layers"] == 2 and d["head_size"] == 16
    assert d["inputs"] == {"input_ids": "input_ids", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    assert d["outputs"]["present_key_names"] == "present.%d.key" and d["outputs"]["logits"] == "logits"
    assert d["session_options"]["provider_options"] == []
    assert cfg["search"]["past_present_share_buffer"] and cfg["search"]["max_length"] == MAX_LEN


@pytest.fixture(scope="module")
def q_artifact(tiny_llama_dir, tmp_path_factory):
    """The int4-g32-onnx recipe: int4 g32 linears, an int8 g32 table read by the tied head too."""
    out = tmp_path_factory.mktemp("onnx-q") / "q"
    _compile(tiny_llama_dir, out, "--recipe", "int4-g32-onnx")
    return out


def _quant_nodes(folder):
    import onnx

    proto = onnx.load(str(folder / "model.onnx"))
    return proto, [n for n in proto.graph.node if n.domain == "com.microsoft"]


def test_validate_cli_passes(artifact):
    res = CliRunner().invoke(main, ["validate", str(artifact), "--steps", "8", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(_stdout(res)[_stdout(res).index("{"):])
    assert report["passed"] and report["runtime"] == "onnxruntime" and report["prefill_max_abs"] < 1e-3


def test_gemma2_validates(gemma2_artifact):
    report = api.validate_artifact(gemma2_artifact, steps=24)  # 24 steps run past the 8-position window
    assert report.passed and report.greedy_equal, report.to_json()


def _genai_greedy(folder, prompt, n):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("which", ["artifact", "gemma2_artifact", "q_artifact"])
def test_genai_generator_matches_reference_greedy(which, request):
    """onnxruntime-genai loads the folder as written and its greedy tokens are the reference's
    (the quantized reference for q_artifact; it stops early only at an eos id)."""
    folder = request.getfixturevalue(which)
    man = json.loads((folder / "manifest.json").read_text())
    n = 30
    got = _genai_greedy(folder, PROMPT, n)
    ref, _ = reference.greedy(api.reference_model(folder, man), PROMPT, n)
    assert got == ref[:len(got)]
    assert len(got) == n or got[-1] in man["model"]["eos_ids"]


def test_compile_is_deterministic(artifact, tiny_llama_dir, tmp_path):
    out = tmp_path / "again"
    _compile(tiny_llama_dir, out)
    for name in ("model.onnx", "genai_config.json"):
        assert (out / name).read_bytes() == (artifact / name).read_bytes(), name
    graph = (artifact / "model.onnx").read_bytes()
    # nothing of this host: the exporter's per-node stack traces name slmc's source paths
    assert b"stack_trace" not in graph and str(Path(slmc.__file__).parent).encode() not in graph


def test_perturbed_initializer_fails_validation(artifact, tmp_path):
    """A broken-artifact control: one weight changed inside model.onnx must be caught."""
    import onnx
    from onnx import numpy_helper

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    proto = onnx.load(str(broken / "model.onnx"))
    init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims) if t.data_type == 1 else 0)
    w = numpy_helper.to_array(init).copy()
    w.flat[::7] += 0.05
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(broken / "model.onnx"))
    res = CliRunner().invoke(main, ["validate", str(broken), "--steps", "8"])
    assert res.exit_code == 1, res.output
    assert "validation failed" in res.output


def test_external_data_file(tiny_llama_dir, tmp_path, monkeypatch):
    """Large weights go to model.onnx.data beside the graph; the session reads them from there."""
    from slmc.targets.onnx import export

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    # big weights are written a chunk at a time, each chunk's pages let go (_write_in_chunks):
    # chunks small enough here that the test model's weights take that path
    monkeypatch.setattr(export, "COPY_CHUNK", 4096)
    mapped, chunked, written = [], [], []

    def spy(ir_model, write=export._write_in_chunks):
        # the weights the graph still reads from the lowering's storage (the rest the
        # exporter's optimizer has folded into arrays of its own): the tied table among them
        mapped.extend(v.name for v in ir_model.graph.initializers.values()
                      if isinstance(getattr(v.const_value, "raw", None), torch.Tensor) and v.const_value.nbytes > 4096)
        write(ir_model)
        for v in ir_model.graph.initializers.values():
            if "tofile" in vars(v.const_value):  # given the chunked writer
                chunked.append(v.name)
                v.const_value.tofile = lambda f, w=v.const_value.tofile, n=v.name: (written.append(n), w(f))

    monkeypatch.setattr(export, "_write_in_chunks", spy)
    m = api.load(tiny_llama_dir, max_seq_len=MAX_LEN)
    tgt = get_target("onnx")
    spec = tgt.spec_class()
    art = tgt.lower(m, spec)
    assert mapped and chunked == mapped and sorted(written) == sorted(chunked)
    assert set(art.files) == {"model.onnx", "model.onnx.data", "genai_config.json"}
    assert art.manifest["external_data"] == "model.onnx.data"
    assert art.files["model.onnx"].stat().st_size < art.files["model.onnx.data"].stat().st_size
    import onnx

    # the data file is the external initializers packed in order, nothing else (staged ones
    # the graph no longer reads are not copied)
    proto = onnx.load(str(art.files["model.onnx"]), load_external_data=False)
    spans = [(int(e["offset"]), int(e["length"])) for e in
             ({x.key: x.value for x in t.external_data} for t in proto.graph.initializer) if e]
    assert spans and [o for o, _ in spans] == list(np.cumsum([0] + [n for _, n in spans[:-1]]))
    assert sum(n for _, n in spans) == art.files["model.onnx.data"].stat().st_size
    out = write_artifact(art, tmp_path / "ext", None)
    s = tgt.open_session(out, json.loads((out / "manifest.json").read_text()))
    got = s.step(PROMPT, 0)
    ref = reference.forward(m, torch.tensor([PROMPT]))[0, -1]
    assert (got - ref).abs().max() < 1e-4
    s.reset()
    assert torch.equal(s.step(PROMPT, 0), got)


def test_float_readback_checks_nothing(tiny_llama_dir, artifact):
    rb = get_target("onnx").readback(api.load(tiny_llama_dir, max_seq_len=MAX_LEN), artifact / "model.onnx")
    assert rb.checked == 0 and not rb.missing and not rb.exact


@pytest.mark.parametrize("args,words", [
    (["--recipe", "int8da-int4w-g32"], ["recipe int8da-int4w-g32 is built for", "int4-g32-onnx"]),
    (["--pass", "quant.rtn:bits=4,group_size=32,act_bits=8"], ["accuracy_level=4", "per-token", "act_bits=0"]),
    (["--pass", "quant.rtn:bits=4,group_size=8"], ["group size 8", "multiple of 16"]),
    (["--pass", "kv.cache:dtype=int8"], ["int8 KV cache", "not lowered"]),
    (["--pass", "kv.cache:window=16"], ["ring-buffer KV cache", "not lowered"]),
    (["--pass", "kv.cache:layout=bshd"], ["bshd", "kv_heads, seq, head_dim"]),
    (["--backend", "qnn:context_binary"], ["QNN context binaries", "QNN"]),
])
def test_refusals_exit_2_with_one_line(tiny_llama_dir, tmp_path, args, words):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-t", "onnx", "-o", str(out), *args])
    assert res.exit_code == 2, res.output
    msg = res.output.strip()
    assert len(msg.splitlines()) == 1, msg
    assert all(w in msg for w in words), msg
    assert not out.exists()


def test_execution_provider_hints(tiny_llama_dir):
    m = api.load(tiny_llama_dir, max_seq_len=MAX_LEN)
    tgt = get_target("onnx")
    art = tgt.lower(m, tgt.spec_class(backend="coreml"))
    cfg = json.loads(art.files["genai_config.json"])
    assert cfg["model"]["decoder"]["session_options"]["provider_options"] == [
        {"CoreML": {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"}}]
    assert art.manifest["execution_provider"]["ort_name"] == "CoreMLExecutionProvider"
    assert not art.manifest["execution_provider"]["host_runnable"]


@pytest.mark.slow
def test_default_model_validates_and_generates_in_genai(tmp_path):
    """SmolLM2-135M fp32: `slmc validate` passes, and onnxruntime-genai's generator on the
    folder gives the reference's greedy tokens."""
    from tokenizers import Tokenizer

    out, man = api.compile_model("default", "onnx", "cpu", tmp_path / "smol", max_seq_len=256)
    assert man["external_data"] == "model.onnx.data"
    report = api.validate_artifact(out, steps=32)
    assert report.passed and report.greedy_equal, report.to_json()
    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(
        "The history of the printing press begins", add_special_tokens=False).ids
    got = _genai_greedy(out, ids, 24)
    ref, _ = reference.greedy(api.reference_model(out, man), ids, 24)
    assert got == ref[:len(got)] and (len(got) == 24 or got[-1] in man["model"]["eos_ids"])


def test_run_generates_the_reference_text(artifact, tiny_llama_dir):
    """`slmc run` on an ONNX folder drives onnxruntime-genai's generator (installed here);
    greedy text == the reference's, and the stats say which runtime ran."""
    from tokenizers import Tokenizer

    res = CliRunner().invoke(main, ["run", str(artifact), "-p", "Hello world", "-n", "16", "--raw"])
    assert res.exit_code == 0, res.output
    tok = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    ids = tok.encode("Hello world", add_special_tokens=False).ids
    out, _ = reference.greedy(api.load(tiny_llama_dir, max_seq_len=MAX_LEN), ids, 16)
    assert len(out) == 16 and "decode: 16 tokens" in res.output
    assert tok.decode(out) in res.output and "onnxruntime-genai" in res.output and "tok/s" in res.output


# --- quantized: slmc's codes in MatMulNBits / GatherBlockQuantized ---------------------------------

def test_quantized_validates_at_the_float_bound(q_artifact):
    """MatMulNBits/GatherBlockQuantized dequantize to the reference's exact fp32 weights, so the
    float bound (FLOAT_EXACT: summation order only) is the one applied, and it passes."""
    man = json.loads((q_artifact / "manifest.json").read_text())
    assert get_target("onnx").tolerance(man) == FLOAT_EXACT
    res = CliRunner().invoke(main, ["validate", str(q_artifact), "--steps", "16", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(_stdout(res)[_stdout(res).index("{"):])
    assert report["passed"] and report["greedy_equal"] and report["prefill_max_abs"] < 1e-3


def test_quantized_graph_holds_codes_not_floats(q_artifact):
    from onnx import TensorProto

    man = json.loads((q_artifact / "manifest.json").read_text())
    m = api.reference_model(q_artifact, man)
    proto, nodes = _quant_nodes(q_artifact)
    ops = sorted(n.op_type for n in nodes)
    # 7 linears per block; the tied head and the gather read the int8 table as its two 4-bit
    # planes (split8.py: ONNX Runtime's fp32 kernels are fast for 4-bit codes only)
    assert ops.count("MatMulNBits") == 7 * m.n_layers + 2 and ops.count("GatherBlockQuantized") == 2
    assert {(n.op_type, a.name, a.i) for n in nodes for a in n.attribute if a.name in ("bits", "accuracy_level")} == {
        ("MatMulNBits", "bits", 4), ("MatMulNBits", "accuracy_level", 1), ("GatherBlockQuantized", "bits", 4)}
    # the tied table's codes are stored once: the gather reads the head's planes through a Reshape
    table = [t for t in proto.graph.initializer if t.name.startswith("embed.qcodes")]
    assert sorted(t.name for t in table) == ["embed.qcodes_hi", "embed.qcodes_lo"]
    assert not any("lm_head" in t.name for t in proto.graph.initializer)
    big_floats = [t.name for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
                  and min(t.dims) >= 32]
    assert not big_floats, big_floats
    rb = get_target("onnx").readback(m, q_artifact / "model.onnx")
    assert rb.exact and rb.checked == 7 * m.n_layers + 2, rb.missing


def _edit_initializer(src, dst, name_part, edit):
    """Copy the artifact with one initializer (the first whose name contains name_part) edited."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / "model.onnx"))
    init = next(t for t in proto.graph.initializer if name_part in t.name)
    a = numpy_helper.to_array(init).copy()
    edit(a)
    init.CopyFrom(numpy_helper.from_array(a, init.name))
    onnx.save(proto, str(dst / "model.onnx"))
    return init.name


def test_readback_catches_one_changed_code(q_artifact, tmp_path):
    """The readback control: one nibble changed in one MatMulNBits B is reported, by name."""
    man = json.loads((q_artifact / "manifest.json").read_text())
    name = _edit_initializer(q_artifact, tmp_path / "b", "blocks.1.ffn.down.weight.qcodes",
                             lambda a: a.reshape(-1).__setitem__(5, a.reshape(-1)[5] ^ 0x01))
    rb = get_target("onnx").readback(api.reference_model(q_artifact, man), tmp_path / "b" / "model.onnx")
    assert rb.missing == ["blocks.1.ffn.down.weight: codes/scales/zero points not stored unchanged in a MatMulNBits"]
    assert name == "blocks.1.ffn.down.weight.qcodes"


def test_changed_scales_fail_validation(q_artifact, tmp_path):
    """The validation control on a quantized graph: one MatMulNBits' scales x1.25 fails `validate`."""
    _edit_initializer(q_artifact, tmp_path / "b", "blocks.0.attn.o.weight.qscales", lambda a: a.__imul__(1.25))
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "b"), "--steps", "8"])
    assert res.exit_code == 1, res.output
    assert "validation failed" in res.output


@pytest.mark.parametrize("quant", [
    # int8 per channel, asymmetric (zero points), int4 asymmetric table: blocks of 64/128 with the
    # channel's scale repeated
    "quant.rtn:bits=8,group_size=0,symmetric=false,embed_bits=4",
    # int4 g16 asymmetric linears, an untied int8 head
    "quant.rtn:bits=4,group_size=16,symmetric=false,head_bits=8",
])
def test_other_schemes_validate_and_read_back(tiny_llama_dir, tmp_path, quant):
    out = tmp_path / "q"
    _compile(tiny_llama_dir, out, "--pass", quant)
    man = json.loads((out / "manifest.json").read_text())
    report = api.validate_artifact(out, steps=16)
    assert report.passed and report.greedy_equal, report.to_json()
    rb = get_target("onnx").readback(api.reference_model(out, man), out / "model.onnx")
    assert rb.exact, rb.missing
    _, nodes = _quant_nodes(out)
    assert any(len(n.input) == 4 for n in nodes)  # asymmetric: zero points stored


@pytest.mark.slow
def test_default_model_int4_recipe_validates_and_generates_in_genai(tmp_path):
    """SmolLM2-135M with int4-g32-onnx: validates at the float bound, reads back exactly, and
    onnxruntime-genai's greedy tokens are the quantized reference's."""
    from tokenizers import Tokenizer

    out, man = api.compile_model("default", "onnx", "cpu", tmp_path / "smol-q", max_seq_len=256,
                                 recipe="int4-g32-onnx")
    report = api.validate_artifact(out, steps=32)
    assert report.passed and report.greedy_equal, report.to_json()
    m = api.reference_model(out, man)
    rb = get_target("onnx").readback(m, out / "model.onnx")
    assert rb.exact and rb.checked == 7 * m.n_layers + 2, rb.missing
    ids = Tokenizer.from_file(str(out / "tokenizer.json")).encode(
        "The history of the printing press begins", add_special_tokens=False).ids
    got = _genai_greedy(out, ids, 24)
    ref, _ = reference.greedy(m, ids, 24)
    assert got == ref[:len(got)] and (len(got) == 24 or got[-1] in man["model"]["eos_ids"])


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 32), (4, False, 16), (8, True, 0), (8, False, 48)])
def test_ops_dequantize_to_the_reference_floats_bit_for_bit(bits, symmetric, group):
    """The claim behind the float bound: onnxruntime's MatMulNBits (accuracy_level=1) and
    GatherBlockQuantized reproduce QuantWeight.float() exactly. MatMulNBits on A = identity
    returns dequant(B)^T (each output one product with 1.0, plus zeros), compared bitwise; the
    gather returns rows of the dequantized table. group 0: per channel (blocks of 64, scale
    repeated); 48: blocks of 16, scales repeated 3x."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slmc.compiler.quant import QuantScheme, rtn
    from slmc.targets.onnx.codes import images

    n, k = 40, 192
    w = rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(bits + group)),
            QuantScheme(bits, group or k, symmetric, "float32"), "rtn")
    im = images(w)
    ref = w.float().numpy()

    def run(node, inits, x_name, x):
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT if
                                                                          x.dtype == np.float32 else TensorProto.INT64,
                                                                          list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, nm) for nm, a in inits])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 10
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {x_name: x})[0]

    zp = [] if im.zeros is None else [("z", im.zeros.reshape(-1))]
    mm = helper.make_node("MatMulNBits", ["a", "b", "s"] + ["z"] * bool(zp), ["y"], domain="com.microsoft",
                          K=k, N=n, bits=bits, block_size=im.block, accuracy_level=1)
    got = run(mm, [("b", im.codes), ("s", im.scales), *zp], "a", np.eye(k, dtype=np.float32))
    assert np.array_equal(got, ref.T)
    zp = [] if im.zeros is None else [("z", im.zeros)]
    gq = helper.make_node("GatherBlockQuantized", ["d", "i", "s"] + ["z"] * bool(zp), ["y"], domain="com.microsoft",
                          bits=bits, block_size=im.block, gather_axis=0, quantize_axis=1)
    idx = np.array([[0, 7, 39, 7]], dtype=np.int64)
    got = run(gq, [("d", im.codes.reshape(n, -1)), ("s", im.scales), *zp], "i", idx)
    assert np.array_equal(got, ref[idx])
    # the control: one code off by one is seen
    bad = im.codes.copy()
    bad.reshape(-1)[3] ^= 1
    got = run(mm, [("b", bad), ("s", im.scales), *([("z", im.zeros.reshape(-1))] if im.zeros is not None else [])],
              "a", np.eye(k, dtype=np.float32))
    assert not np.array_equal(got, ref.T)
