"""The real model, end to end (slow: minutes). SmolLM2-135M-Instruct fp32 ->
ExecuTorch/XNNPACK .pte: validation passes and greedy text equals transformers'."""

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPT = "The history of the printing press begins"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from slmc import api
    from slmc.default_model import default_model_dir

    src = default_model_dir()
    out, manifest = api.compile_model("default", "executorch", "xnnpack",
                                      tmp_path_factory.mktemp("smol") / "et", max_seq_len=256)
    return src, out, manifest


def test_smollm2_validates(smol):
    from slmc import api

    _, out, manifest = smol
    assert manifest["model"]["layers"] == 30 and manifest["model"]["vocab_size"] == 49152
    report = api.validate_artifact(out, steps=32)
    assert report.passed and report.greedy_equal, report.to_json()


def test_smollm2_greedy_text_equals_transformers(smol):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from slmc.targets.executorch.session import ExecuTorchSession

    src, out, _ = smol
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    s = ExecuTorchSession(out / "model.pte")
    got, logits = [], s.step(ids, 0)
    for i in range(32):
        got.append(int(logits.argmax()))
        logits = s.step([got[-1]], len(ids) + i)
    assert tok.decode(got) == tok.decode(gen)
    assert got == gen


def test_smollm2_stock_runner_answers(smol):
    from slmc.runtime_tests.generate import generate

    _, out, _ = smol
    stats = generate(out, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in stats["text"]
    assert stats["generated_tokens"] > 0 and stats["decode_tok_s"] > 0
