"""One suite over flows (target x backend x family): compile a tiny random model,
run the artifact in its own runtime, compare with the reference executor.

Each flow's tolerance comes from its target's `tolerances` (slmc/targets/<name>/target.py),
keyed by backend (Core ML: compute precision) and weight kind.
"""

import json

import pytest

from slmc import api
from slmc.compiler.families import FAMILIES, load_all
from slmc.targets import TARGETS
from slmc.targets import load_all as load_targets

load_all()
load_targets()

# Every host-runnable (target, backend) on every family for its first backend, llama for the rest.
# The default suite runs, per target, the families that between them exercise every IR
# feature (GQA + tied head, soft-capping + sliding windows + sandwich norms, fused qkv +
# partial rotary, MoE + shared expert); the other families run with the slow marker (CI).
# Backends past a target's second (Core ML's ane and gpu/iOS 17 variants) run with `slow` too.
CORE_FAMILIES = {"llama", "gemma2", "phi3", "qwen2_moe"}
FLOWS = [pytest.param(t.name, b, fam, id=f"{t.name}-{b}-{fam}",
                      marks=() if fam in CORE_FAMILIES and i < 2 else pytest.mark.slow)
         for t in TARGETS.values() for i, b in enumerate(t.host_backends)
         for fam in (sorted(FAMILIES) if i == 0 else ["llama"])]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from tiny import save_ascii_tokenizer, save_hf_model

    made = {}

    def get(fam):
        if fam not in made:
            d = tmp_path_factory.mktemp(fam)
            save_hf_model(FAMILIES[fam].tiny_config(), d)
            save_ascii_tokenizer(d, FAMILIES[fam].tiny_config()["vocab_size"])
            made[fam] = d
        return made[fam]

    return get


@pytest.mark.parametrize("target,backend,family", FLOWS)
def test_flow_validates(target, backend, family, family_dirs, tmp_path):
    out, manifest = api.compile_model(family_dirs(family), target, backend, tmp_path / "out", max_seq_len=48)
    assert manifest["target"] == target and manifest["backend"] == backend
    assert manifest["model"]["family"] == family
    # The reference is rebuilt from the manifest: source path + hash + pass pipeline.
    report = api.validate_artifact(out, steps=24)
    assert report.passed, report.to_json()
    assert report.greedy_equal and report.top1_agreement >= report.tolerance["min_top1"]
    if report.tolerance["max_abs"] is not None:  # the exact rule (fp16 flows are judged statistically)
        assert report.decode_max_abs <= report.tolerance["max_abs"]
    recorded = json.loads((out / "manifest.json").read_text())["validation"]
    assert recorded["passed"] and recorded["decode_steps"] == 24
