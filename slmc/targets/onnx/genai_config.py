"""`genai_config.json`: the folder as onnxruntime-genai's generator loads it.

The fields are those onnxruntime-genai's model builder writes (builders/base.py,
make_genai_config); values come from the IR and, for the search defaults, from the source's
generation_config.json when it has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ...compiler.ir import Model
from ...compiler.textdata import find_tokenizer_dir
from .export import PAST, PRESENT


@dataclass(frozen=True)
class Provider:
    ort_name: str  # onnxruntime's name for the execution provider
    genai_name: str | None  # the provider_options key in genai_config (None: the default CPU EP)
    options: dict
    note: str


# backend -> execution provider. The graph is the same file for every backend; an EP takes the
# nodes it can when the session is created on the device (genai reads the provider options).
PROVIDERS = {
    "cpu": Provider("CPUExecutionProvider", None, {}, "onnxruntime's default CPU kernels (MLAS)"),
    "xnnpack": Provider("XnnpackExecutionProvider", "XNNPACK", {},
                        "Android/iOS/Arm builds of onnxruntime; not in the PyPI x86-64 wheel"),
    "nnapi": Provider("NnapiExecutionProvider", "NNAPI", {}, "Android builds of onnxruntime (NNAPI)"),
    "coreml": Provider("CoreMLExecutionProvider", "CoreML", {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"},
                       "Apple builds of onnxruntime; compiles to an ML Program at session creation"),
    "qnn": Provider("QNNExecutionProvider", "QNN", {"backend_path": "libQnnHtp.so"},
                    "onnxruntime-qnn (Windows on Arm, Android) with Qualcomm's HTP backend library"),
}

# onnxruntime-genai model types that are plain decoders (model_type.h); others run as "decoder".
# phi3 is left out: genai re-runs the prompt at 4097 tokens for Phi-3's longrope, which the
# graph's own rope tables do not need.
_GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                "gemma2": "gemma2", "gemma3": "gemma3_text"}

_SEARCH = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def genai_type(model: Model) -> str:
    return _GENAI_TYPES.get(model.family, "decoder")


def _generation_config(model: Model) -> dict:
    d = find_tokenizer_dir(model.source.get("path"))
    try:
        return json.loads((d / "generation_config.json").read_text()) if d else {}
    except (OSError, json.JSONDecodeError):
        return {}


def genai_config(model: Model, backend: str) -> dict:
    attn = model.block_at(0).attn
    gen = _generation_config(model)
    search = {k: gen[k] if gen.get(k) is not None else v for k, v in _SEARCH.items()}
    eos = list(model.eos_ids)
    pad = gen.get("pad_token_id")
    prov = PROVIDERS[backend]
    cfg = {
        "model": {
            "context_length": model.kv.max_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": [{prov.genai_name: prov.options}] if prov.genai_name else []},
                "filename": "model.onnx",
                "head_size": attn.head_dim,
                "hidden_size": model.hidden_size,
                "inputs": {"input_ids": "input_ids", "position_ids": "position_ids",
                           "past_key_names": PAST % "key", "past_value_names": PAST % "value"},
                "outputs": {"logits": "logits",
                            "present_key_names": PRESENT % "key", "present_value_names": PRESENT % "value"},
                "num_attention_heads": attn.n_heads,
                "num_hidden_layers": model.n_layers,
                "num_key_value_heads": attn.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
            "type": genai_type(model),
            "vocab_size": model.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "early_stopping": True, "length_penalty": 1.0,
            "max_length": model.kv.max_len, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1,
            # slmc's caches have a fixed length: past and present are one buffer
            "past_present_share_buffer": True,
            **search,
        },
    }
    if model.bos_id is not None:
        cfg["model"]["bos_token_id"] = model.bos_id
    return cfg
