"""slmc estimate: byte and operation counts checked against a hand computation on a tiny
config, the runtime model's arithmetic, the subjects it takes (a folder holding only
config.json, an artifact folder's manifest), its one-line errors, the fit of the runtime
parameters to the published figures and the leave-one-out check (tests/test_estimate_fit.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slmc import api
from slmc.errors import SlmcError
from slmc.estimate import DEVICES, RUNTIMES, Scheme, Storage, decode_cost, device, estimate, prefill_cost, shape_of
from slmc.estimate.devices import Cores, Device
from slmc.estimate.runtimes import Runtime

ROOT = Path(__file__).resolve().parent.parent
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
I4 = Scheme(4, 32, 2, False, 8)  # int8da-int4w-g32: int4 g32, bf16 scales, int8 activations
STORE = Storage(I4, Scheme(4, 32, 2), I4, 32, 32)

# By hand, per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128:
# 36864 multiply-adds; int4: 36864 / 2 bytes + 36864 / 32 groups x 2-byte scales = 20736;
# two fp32 norms: 512. Blocks: 2 x (20736 + 512) + final norm 256 = 42752.
# Head 256x64 int4 g32: 8192 + 512 x 2 = 9216; one embedding row: 32 + 2 x 2 = 36.
# KV row (2 heads x 16 dims, K and V, fp32) per layer: 256 bytes.
BLOCKS, HEAD, ROW, KV_ROW, MACS = 42752, 9216, 36, 256, 2 * 36864


def test_decode_counts_match_hand_computation():
    s = shape_of(TINY, "config.json")
    c = decode_cost(s, STORE, pos=10)
    # position 10 attends to 11 positions in each of 2 layers, and writes one row per layer
    assert c["kv_read_bytes"] == 2 * 11 * KV_ROW
    assert c["bytes"] == BLOCKS + HEAD + ROW + 2 * 11 * KV_ROW + 2 * KV_ROW == 58148
    assert c["ops"] == 2 * MACS + 2 * 256 * 64 + 4 * 4 * 16 * 2 * 11 == 185856


def test_prefill_counts_match_hand_computation():
    s = shape_of(TINY, "config.json")
    c = prefill_cost(s, STORE, tokens=8)
    # 8 tokens through every linear, the head once (last position), causal attention 1+2+...+8 per layer
    assert c["ops"] == 2 * MACS * 8 + 2 * 256 * 64 + 4 * 4 * 16 * 2 * 36 == 1230848
    assert c["bytes"] == BLOCKS + HEAD + 8 * ROW + 2 * 2 * 8 * KV_ROW


def test_storage_changes_the_bytes():
    """Control: the same shapes stored in fp32 read 4 bytes per weight (not the int4 count)."""
    s = shape_of(TINY, "config.json")
    f = Scheme(32)
    c = decode_cost(s, Storage(f, f, f, 32, 32), pos=10)
    assert c["weight_bytes"] == 4 * (MACS + 2 * 128 + 64) + 4 * 256 * 64  # linears, norms, head
    assert c["bytes"] != decode_cost(s, STORE, pos=10)["bytes"]


def test_decode_is_memory_plus_layer_overhead():
    s = shape_of(TINY, "config.json")
    dev = Device("test phone", "test", "soc", "LPDDR5", 1000, 64, "made up", (Cores(1, "Cortex-X2", 2.0),), "made up")
    rt = Runtime("t:b", "test", "cpu", 0.5, 1000.0, 0.25, 10.0, "made up")
    e = estimate(s, STORE, dev, rt, max_len=64, prompt_len=2, decode_tokens=16)
    assert e["decode_position"] == 10
    t_mem = 58148 / (8.0e9 * 0.5)  # 1000 MT/s x 64 bit = 8 GB/s
    t_over = 2 * 1000 / 2.0e9  # 2 layers x 1000 cycles at 2 GHz
    assert e["decode"]["tok_s"] == pytest.approx(1 / (t_mem + t_over))
    assert e["decode"]["bound"] == ("memory" if t_mem >= t_over else "overhead")
    t_pre = prefill_cost(s, STORE, tokens=2)["ops"] / (2.0 * 4 * 32 * 1e9 * 0.25)  # 1 core, 2 GHz, 4 pipes x 32
    assert e["prefill"]["tok_s"] == pytest.approx(2 / t_pre) and e["prefill"]["bound"] == "compute"
    assert e["memory_mib"]["peak"] == pytest.approx(sum(v for k, v in e["memory_mib"].items() if k != "peak"))
    # control: the overhead term counts (a runtime with none is faster)
    free = estimate(s, STORE, dev, Runtime("t:b", "test", "cpu", 0.5, 0.0, 0.25, 10.0, "made up"), max_len=64,
                    prompt_len=2, decode_tokens=16)
    assert free["decode"]["tok_s"] == pytest.approx(1 / t_mem) and free["decode"]["tok_s"] > e["decode"]["tok_s"]


def test_config_only_folder(tmp_path):
    """A folder holding only config.json is a subject: the recipe gives the storage."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    e = api.estimate(tmp_path, api.EstimateOptions("galaxy-s22", recipe="int8da-int4w-g32", prompt_len=2,
                                                   decode_tokens=16, max_seq_len=64, bare=True))
    assert e["decode"]["bytes_per_token"] == 58148 and e["decode"]["ops_per_token"] == 185856
    assert e["runtime"] == "executorch:xnnpack" and e["arithmetic"] == "int8"
    plain = api.estimate(tmp_path, api.EstimateOptions("galaxy-s22", prompt_len=2, decode_tokens=16, max_seq_len=64,
                                                       bare=True))
    assert plain["arithmetic"] == "fp32" and plain["decode"]["bytes_per_token"] > 58148  # control: no recipe
    with pytest.raises(SlmcError, match="no published phone figures to fit coreml"):
        api.estimate(tmp_path, api.EstimateOptions("iphone-15-pro", target="coreml"))


def _artifact(tmp_path, pipeline) -> Path:
    src = tmp_path / "src"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(TINY))
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({
        "target": "executorch", "backend": "xnnpack", "source": {"path": str(src)}, "pipeline": pipeline,
        "kv_cache_spec": {"max_len": 64, "dtype": "float32", "window": None}}))
    return art


QUANT = {"name": "quant.rtn", "options": {"bits": 4, "group_size": 32, "symmetric": True, "embed_bits": 4,
                                          "head_bits": 4, "scale_dtype": "bfloat16", "act_bits": 8}}


def test_artifact_folder_reads_its_manifest(tmp_path):
    art = _artifact(tmp_path, [{"name": "canon.fuse_projections", "options": {}}, QUANT])
    e = api.estimate(art, api.EstimateOptions("oneplus-12", prompt_len=2, decode_tokens=16, bare=True))
    assert e["max_len"] == 64 and e["decode"]["bytes_per_token"] == 58148
    with pytest.raises(SlmcError, match="describe a model"):
        api.estimate(art, api.EstimateOptions("oneplus-12", recipe="int8da-int8w"))


def test_a_tied_head_reads_the_quantized_table(tmp_path):
    """embed_bits without head_bits leaves a tied head reading the quantized table (the ONNX
    recipe int4-g32-onnx): the head is counted at the table's int8 g32, not in fp32. Controls:
    the same options on an untied model, or after canon.untie_embeddings, count an fp32 head."""
    q8 = {"name": "quant.rtn", "options": {"bits": 4, "group_size": 32, "symmetric": True, "embed_bits": 8}}
    opts = api.EstimateOptions("oneplus-12", prompt_len=2, decode_tokens=16, bare=True)
    head8, head32 = 256 * 64 + 256 * 2 * 4, 4 * 256 * 64  # int8 g32 with fp32 scales; fp32
    tied = api.estimate(_artifact(tmp_path / "t", [q8]), opts)
    assert tied["storage"]["head"] == tied["storage"]["embedding"] == "int8 g32 (4-byte scales)"
    untie = api.estimate(_artifact(tmp_path / "u", [{"name": "canon.untie_embeddings", "options": {}}, q8]), opts)
    assert untie["storage"]["head"] == "fp32"
    assert untie["decode"]["bytes_per_token"] - tied["decode"]["bytes_per_token"] == head32 - head8
    TINY["tie_word_embeddings"] = False
    try:
        assert api.estimate(_artifact(tmp_path / "n", [q8]), opts)["storage"]["head"] == "fp32"
    finally:
        TINY["tie_word_embeddings"] = True


def test_shape_changing_pass_is_refused(tmp_path):
    art = _artifact(tmp_path, [{"name": "arch.gqa", "options": {"kv_groups": 1}}, QUANT])
    with pytest.raises(SlmcError, match="arch.gqa changes the model's shapes"):
        api.estimate(art, api.EstimateOptions("pixel-8"))


def test_unknown_device_is_one_line_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    r = subprocess.run([sys.executable, "-m", "slmc.cli", "estimate", str(tmp_path), "-d", "nokia-3310"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown device 'nokia-3310'" in lines[0] and "galaxy-s22" in lines[0]
    ok = subprocess.run([sys.executable, "-m", "slmc.cli", "estimate", str(tmp_path), "-d", "all", "--bare",
                         "--recipe", "int8da-int4w-g32"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert all(d.name in ok.stdout for d in DEVICES.values())


def test_device_table_has_sources():
    for d in DEVICES.values():
        assert d.bandwidth_gbs == d.mts * d.bus_bits / 8000
        assert d.memory_source and d.cpu_source and d.cpu_peak("int8") == 4 * d.cpu_peak("fp32")
    assert device("Galaxy S22") is device("galaxy-s22") is DEVICES["galaxy-s22"]
    with pytest.raises(SlmcError, match="no published GPU"):
        device("pixel-8").peak("gpu", "fp16")


def test_cli_prints_every_phone_and_the_figures_fitted_on(tmp_path):
    """`slmc estimate -d all` on a config-only folder: a row per named phone, with the fitted
    parameters and the published figures they came from."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    r = subprocess.run([sys.executable, "-m", "slmc.cli", "estimate", str(tmp_path), "-d", "all",
                        "--recipe", "int8da-int4w-g32"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for name in ("Galaxy S22", "Galaxy S24 Ultra", "Pixel 8", "iPhone 15 Pro", "OnePlus 12"):
        assert sum(line.startswith(name) for line in r.stdout.splitlines()) == 1, name
    rt = RUNTIMES["executorch:xnnpack"]
    assert f"fitted on {len(rt.figures)} published phone figures" in r.stdout
    assert all(k in r.stdout for k in rt.figures)
