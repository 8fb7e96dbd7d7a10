"""Every artifact in its platform's stock LLM runner, driven by `slmc run`:
ExecuTorch's TextLLMRunner (.pte), LiteRT-LM's engine (.litertlm), onnxruntime-genai's generator
(onnx). Greedy text must equal transformers' (float artifacts) or slmc's quantized reference
executor's (weight-only codes, float activations). The one exception is stated where it is made:
ExecuTorch has no float-activation int4 (XNNPACK runs int4 only as 8da4w), and int8 dynamic
activations are not bit-reproducible by the reference, so there the runner's text is compared with
slmc's own ExecuTorch session on the same .pte (same runtime, same kernels).

Default tests use the tiny model (the ExecuTorch tiny test is tests/test_executorch.py); the
SmolLM2-135M ones are slow-marked and hold the machine's heavy lock when run by hand."""

import json

import pytest
from click.testing import CliRunner

from slmc import api
from slmc.cli import main
from slmc.compiler import reference
from slmc.runtime_tests import generate as gen_mod

PROMPT = "Hello world"


def _run(folder, n=16):
    res = CliRunner().invoke(main, ["run", str(folder), "-p", PROMPT, "-n", str(n), "--raw"])
    assert res.exit_code == 0, res.output
    # without whitespace: the console wraps the stats line to the terminal's width
    return "".join(res.output.split())


def _flat(text: str) -> str:
    return "".join(text.split())


def _reference_text(folder, n=16, prompt=PROMPT):
    from tokenizers import Tokenizer

    man = json.loads((folder / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(prompt, add_special_tokens=False).ids
    out, _ = reference.greedy(api.reference_model(folder, man), ids, n)
    eos = set(man["model"]["eos_ids"])
    out = out[:next((i for i, t in enumerate(out) if t in eos), len(out))]
    return tok.decode(out)


@pytest.fixture(scope="module")
def tiny_tflite(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfl") / "a"
    api.compile_model(tiny_llama_dir, "tflite", "cpu", out, max_seq_len=64)
    return out


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "a"
    api.compile_model(tiny_llama_dir, "onnx", "cpu", out, max_seq_len=64)
    return out


def test_litertlm_runs_in_litert_lm_engine(tiny_tflite):
    """The .litertlm bundle in LiteRT-LM's own engine (top-k 1): the reference's greedy text."""
    pytest.importorskip("litert_lm")
    out = _run(tiny_tflite)
    assert "LiteRT-LMengine" in out and "decode:16tokens" in out
    assert _flat(_reference_text(tiny_tflite)) in out


def test_onnx_runs_in_genai_generator(tiny_onnx):
    pytest.importorskip("onnxruntime_genai")
    out = _run(tiny_onnx)
    assert "onnxruntime-genai" in out and "decode:16tokens" in out
    assert _flat(_reference_text(tiny_onnx)) in out


@pytest.mark.parametrize("which", ["tiny_onnx", "tiny_tflite"])
def test_without_the_stock_runner_slmc_session_runs_and_says_so(which, request, monkeypatch):
    """Where the runner's package is missing, `slmc run` falls back to slmc's session (the same
    text) and says that no stock runner ran."""
    folder = request.getfixturevalue(which)
    monkeypatch.setattr(gen_mod, "_installed", lambda module: False)
    out = _run(folder)
    assert "slmc's" in out and "nostockrunner" in out and "genai" not in out and "LiteRT-LM" not in out
    assert _flat(_reference_text(folder)) in out


# --- SmolLM2-135M: fp32 and one int4 recipe per target ---------------------------------------------

SMOL_PROMPT = "The history of the printing press begins"
N = 24


def _transformers_text(n=N):
    """transformers' own greedy continuation of the float model (the source of truth for fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = api.resolve_model_path("default")
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids = tok(SMOL_PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=model.config.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    new = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]
    return tok.decode(new)


def _stock(folder, n=N):
    return api.run(folder, api.RunOptions(SMOL_PROMPT, max_new_tokens=n, temperature=0.0, chat=False),
                   on_text=lambda s: None)


FLOWS = [  # (target, backend, recipe, runner named in the stats, compared with)
    ("executorch", "xnnpack", None, "TextLLMRunner", "transformers"),
    ("executorch", "xnnpack", "int8da-int4w-g32", "TextLLMRunner", "session"),
    ("tflite", "cpu", None, "LiteRT-LM engine", "transformers"),
    ("tflite", "cpu", "int4-g32-litert", "LiteRT-LM engine", "reference"),
    ("onnx", "cpu", None, "onnxruntime-genai", "transformers"),
    ("onnx", "cpu", "int4-g32-onnx", "onnxruntime-genai", "reference"),
]


@pytest.mark.slow
@pytest.mark.parametrize("target,backend,recipe,runner,versus", FLOWS,
                         ids=[f"{t}-{r or 'fp32'}" for t, _, r, _, _ in FLOWS])
def test_default_model_in_stock_runner(target, backend, recipe, runner, versus, tmp_path):
    out, man = api.compile_model("default", target, backend, tmp_path / "a", max_seq_len=256, recipe=recipe)
    got = _stock(out)
    assert runner in got["runtime"], got["runtime"]
    if versus == "transformers":
        want = _transformers_text()
    elif versus == "reference":
        want = _reference_text(out, N, SMOL_PROMPT)
    else:  # the same .pte in slmc's ExecuTorch session (see the module docstring)
        want = gen_mod.session_generate(out, man, SMOL_PROMPT, N, 0.0, lambda s: None)["text"]
    assert got["text"] == want, (got["text"], want)
