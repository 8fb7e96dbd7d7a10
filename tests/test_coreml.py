"""The Core ML target: package structure, swift-transformers conventions, the iOS 17 I/O
variant, the Neural Engine layout, refusals, and the MIL interpreter that checks it all on
Linux (MLModel.predict itself only on macOS)."""

import json
import sys

import pytest
from click.testing import CliRunner

from slmc import api
from slmc.cli import main

L = 32  # --max-seq-len of every compile here


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _compile(src, out, backend=None):
    args = ["compile", src, "-o", out, "--target", "coreml", "--max-seq-len", L, "--json"]
    res = _cli(*args, *(["--backend", backend] if backend else []))
    assert res.exit_code == 0, res.output
    return json.loads((out / "manifest.json").read_text())


def _spec(folder):
    import coremltools as ct

    return ct.models.MLModel(str(folder / "model.mlpackage"), skip_model_load=True).get_spec()


def _features(desc):
    from coremltools.proto import FeatureTypes_pb2 as ft

    out = {}
    for f in desc:
        t = f.type.stateType.arrayType if f.type.HasField("stateType") else f.type.multiArrayType
        dtype = ft.ArrayFeatureType.ArrayDataType.Name(t.dataType)
        ranges = [(r.lowerBound, r.upperBound) for r in t.shapeRange.sizeRanges]
        out[f.name] = (dtype, list(t.shape), ranges)
    return out


@pytest.fixture(scope="module")
def loud_llama_dir(tiny_llama_dir, tmp_path_factory):
    """Tiny llama with one outlier channel (embedding column 0 x2000, as SmolLM2's residual
    stream reaches 2e4): x * x overflows fp16 unless the norms are computed overflow-safe.
    The final norm scales that channel back, so the tied head gives logits of the usual size."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("loud") / "loud-llama"
    shutil.copytree(tiny_llama_dir, d)
    w = load_file(d / "model.safetensors")
    w["model.embed_tokens.weight"][:, 0] *= 2000
    w["model.norm.weight"][0] /= 2000
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def default_art(loud_llama_dir, tmp_path_factory):
    """The default flow: iOS 18, fp16, states, compute units `all`."""
    out = tmp_path_factory.mktemp("coreml") / "tiny-coreml"
    return out, _compile(loud_llama_dir, out)


def test_multifunction_package_shares_weights(default_art):
    out, m = default_art
    spec = _spec(out)
    assert set(spec.mlProgram.functions) == {"prefill", "decode"}
    assert spec.description.defaultFunctionName == "prefill" == m["default_function"]
    assert {f.name for f in spec.description.functions} == {"prefill", "decode"}
    weights = m["files"]["model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"]
    fp16_params = 2 * m["model"]["params"]
    assert weights < 1.3 * fp16_params, (weights, fp16_params)  # stored once, not per function
    assert m["format"] == "mlpackage" and m["precision"] == "fp16" and m["deployment_target"] == "ios18"
    assert (out / "tokenizer.json").is_file() and m["kv_cache"]["kind"] == "states"


def test_swift_transformers_names_shapes_and_metadata(default_art):
    """What swift-transformers' LanguageModel reads: inputIds (ranged length, max - min > 1),
    causalMask (Float16), states keyCache/valueCache, a rank-3 `logits`, the model name."""
    out, m = default_art
    spec = _spec(out)
    cache = [m["model"]["layers"], 2, L, 16]  # tiny llama: 2 KV heads, head_dim 16
    for fn in spec.description.functions:
        ins, states, outs = _features(fn.input), _features(fn.state), _features(fn.output)
        assert list(ins) == ["inputIds", "causalMask"] and list(outs) == ["logits"]
        assert ins["inputIds"][0] == "INT32" and ins["causalMask"][0] == "FLOAT16"
        assert states == {"keyCache": ("FLOAT16", cache, []), "valueCache": ("FLOAT16", cache, [])}
        assert outs["logits"][0] == "FLOAT16"
        if fn.name == "prefill":
            lo, hi = ins["inputIds"][2][1]
            assert lo == 1 and hi - lo > 1  # LanguageModelWithStatefulKVCache needs a ranged length
        else:
            assert ins["inputIds"][1] == [1, 1] and ins["inputIds"][2] == []
    user = dict(spec.description.metadata.userDefined)
    assert user["co.huggingface.exporters.name"] == m["source"]["path"].rstrip("/").split("/")[-1]
    io = m["io"]["prefill"]
    assert [o["shape"] for o in io["outputs"]] == [[1, f"1..{L - 1}", 256]]
    assert "swift-transformers" in m["conventions"]["compatible_with"]


def test_default_artifact_validates_with_the_mil_interpreter(default_art):
    """fp16 all the way, on activations whose squares overflow fp16."""
    out, _ = default_art
    report = api.validate_artifact(out, steps=8)
    assert report.passed, report.to_json()
    assert report.runtime == "coreml-mil-interpreter" and report.top1_agreement == 1.0


def test_ios17_variant_has_the_cache_as_io_and_validates(tiny_llama_dir, tmp_path):
    out = tmp_path / "ios17"
    m = _compile(tiny_llama_dir, out, "cpu:deployment_target=ios17,precision=fp32")
    spec = _spec(out)
    assert list(spec.mlProgram.functions) == ["main"] and m["default_function"] == "main"
    assert spec.specificationVersion == 8  # iOS 17
    ins, outs = _features(spec.description.input), _features(spec.description.output)
    assert list(ins) == ["inputIds", "causalMask", "keyCache", "valueCache"]
    assert list(outs) == ["logits", "presentKeys", "presentValues"]
    assert ins["keyCache"][:2] == ("FLOAT32", [2, 2, L, 16]) and not spec.description.state
    report = api.validate_artifact(out, steps=8)
    assert report.passed and report.greedy_equal and report.decode_max_abs < 2e-3, report.to_json()


def test_ane_layout_is_convolutions_of_rank_at_most_4(tmp_path):
    """On Gemma 2 (sliding window, soft-capping, sandwich norms): the flow suite has llama."""
    from tiny import save_ascii_tokenizer, save_hf_model

    from slmc.compiler.families.gemma2 import tiny_config
    from slmc.targets.coreml.mil_interp import MILProgram

    src, out = tmp_path / "gemma2", tmp_path / "ane"
    save_hf_model(tiny_config(), src)
    save_ascii_tokenizer(src)
    m = _compile(src, out, "ane")
    assert m["layout"] == "ane" and m["compute_units"]["coremltools"] == "CPU_AND_NE"
    prog = MILProgram(out / "model.mlpackage")
    for f in prog.functions.values():
        kinds = {op.op_type for op in f.operations}
        assert "conv" in kinds and "linear" not in kinds, kinds
        assert max(len(v.shape) for op in f.operations for v in op.outputs) <= 4
    weights = m["files"]["model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"]
    assert weights < 1.1 * 2 * m["model"]["params"]  # the tied embedding is stored once
    report = api.validate_artifact(out, steps=8)
    # fp16 compute is judged statistically (targets/bounds.py): top-1 over 512+ positions may miss near ties
    assert report.passed and report.top1_agreement >= report.tolerance["min_top1"], report.to_json()


@pytest.mark.parametrize("backend,words", [
    ("npu", ["unknown backend", "cpu, gpu, ane, all"]),
    ("ane:deployment_target=ios15", ["iOS 16", "ane"]),
    ("all:deployment_target=ios17,kv=states", ["iOS 18", "states"]),
    ("cpu:precision=fp32,kv=states", ["fp16 only"]),
    ("ane:precision=fp32", ["fp16 only", "ane"]),
    ("all:deployment_target=ios14", ["ios14", "ios15, ios16, ios17, ios18"]),
    ("all:flavour=x", ["unknown Core ML option"]),
])
def test_refusals_exit_2_and_write_nothing(tiny_llama_dir, tmp_path, backend, words):
    res = _cli("compile", tiny_llama_dir, "-o", tmp_path / "out", "--target", "coreml", "--backend", backend)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "--backend" in res.output
    for w in words:
        assert w in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temp folder


def test_interpreter_names_an_op_it_does_not_know(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from slmc.targets.coreml.mil_interp import MILProgram, UnknownOpError

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.sin(x=mb.add(x=x, y=1.0))

    ml = ct.convert(prog, convert_to="mlprogram", skip_model_load=True, minimum_deployment_target=ct.target.iOS17)
    ml.save(str(tmp_path / "sin.mlpackage"))
    with pytest.raises(UnknownOpError, match="does not know: sin"):
        MILProgram(tmp_path / "sin.mlpackage")


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions (MLModel.predict) need macOS")
def test_mlmodel_predict_matches_the_reference(default_art):
    from slmc.targets.coreml.session import CoreMLSession
    from slmc.runtime_tests.validate import validate

    out, m = default_art
    session = CoreMLSession(out, m, use_coreml=True)
    assert session.runtime == "coreml"
    report = validate(out, m, api.reference_model(out, m), steps=8)
    assert report.runtime == "coreml" and report.passed, report.to_json()
