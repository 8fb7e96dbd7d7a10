"""The platforms' own LLM runners, driven as an app would (generate.py picks one).

Both take token ids from the artifact's tokenizer.json (the `tokenizers` library, as slmc's
session does) so the three runners see the same prompt ids; the runner then does the rest:
prefill, its own KV cache handling, greedy (or sampled) decoding and its stop tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..errors import SlmcError


class _Text:
    """Incremental detokenization that never emits half a UTF-8 character."""

    def __init__(self, tok, on_text: Callable[[str], None]):
        self.tok, self.on_text, self.out, self.shown = tok, on_text, [], ""

    def add(self, t: int) -> None:
        self.out.append(t)
        now = self.tok.decode(self.out)
        if not now.endswith("\ufffd"):  # a byte-level token may end inside a character
            self.on_text(now[len(self.shown):])
            self.shown = now

    def finish(self) -> str:
        text = self.tok.decode(self.out)
        if text != self.shown:
            self.on_text(text[len(self.shown):])
        return text


def _prompt_ids(folder: Path, text: str, room: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids or len(ids) >= room:
        raise SlmcError(f"the prompt is {len(ids)} tokens; this artifact's KV cache takes 1..{room - 1} "
                        "(compile with a larger --max-seq-len)", str(folder))
    return tok, ids


def _stats(n_prompt: int, n_out: int, t0: float, t1: float, t2: float, runtime: str, tokens, text: str) -> dict:
    return {"prompt_tokens": n_prompt, "generated_tokens": n_out, "tokens": tokens,
            "prefill_ms": (t1 - t0) * 1000, "decode_ms": (t2 - t1) * 1000,
            "prefill_tok_s": n_prompt / max(t1 - t0, 1e-9), "decode_tok_s": n_out / max(t2 - t1, 1e-9),
            "runtime": runtime, "text": text}


def genai_generate(folder: Path, manifest: dict, text: str, max_new_tokens: int, temperature: float,
                   on_text: Callable[[str], None]) -> dict:
    """onnxruntime-genai's generator on the folder (genai_config.json as written by the target)."""
    import numpy as np
    import onnxruntime_genai as og

    max_len = int(manifest["kv_cache_spec"]["max_len"])
    tok, ids = _prompt_ids(folder, text, max_len)
    try:
        model = og.Model(str(folder))
    except Exception as e:  # genai raises its own RuntimeError with the config problem
        raise SlmcError(f"onnxruntime-genai could not load the folder: {e}", str(folder)) from None
    n = min(max_new_tokens, max_len - len(ids))
    params = og.GeneratorParams(model)
    search = {"max_length": len(ids) + n, "do_sample": temperature > 0}
    if temperature > 0:
        search.update(temperature=temperature, top_k=0, top_p=1.0, random_seed=0)
    params.set_search_options(**search)
    gen = og.Generator(model, params)
    eos = set((manifest.get("model") or {}).get("eos_ids") or [])
    t0 = time.perf_counter()
    gen.append_tokens(np.array([ids], dtype=np.int32))  # the prompt's forward pass runs here
    t1 = time.perf_counter()
    out = _Text(tok, on_text)
    while not gen.is_done() and len(out.out) < n:
        gen.generate_next_token()
        t = int(gen.get_next_tokens()[0])
        if t in eos:
            break
        out.add(t)
    t2 = time.perf_counter()
    return _stats(len(ids), len(out.out), t0, t1, t2, f"onnxruntime-genai {og.__version__} generator",
                  out.out, out.finish())


def litert_lm_generate(path: Path, manifest: dict, text: str, max_new_tokens: int, temperature: float,
                       on_text: Callable[[str], None]) -> dict:
    """LiteRT-LM's engine on the .litertlm bundle (its own tokenizer, start and stop tokens from
    the bundle's LlmMetadata); greedy is its sampler with top_k=1."""
    import litert_lm

    max_len = int(manifest["kv_cache_spec"]["max_len"])
    _, ids = _prompt_ids(path.parent, text, max_len)
    n = min(max_new_tokens, max_len - len(ids) - 1)
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    try:
        engine = litert_lm.Engine(str(path), backend=litert_lm.Backend.CPU(), max_num_tokens=max_len,
                                  enable_benchmark=True)
    except Exception as e:
        raise SlmcError(f"LiteRT-LM could not load the bundle: {e}", str(path)) from None
    greedy = temperature <= 0
    sampler = litert_lm.SamplerConfig(top_k=1 if greedy else 0, top_p=1.0, temperature=0.0 if greedy else temperature,
                                      seed=0)
    session = engine.create_session(apply_prompt_template=False, sampler_config=sampler, max_output_tokens=n)
    try:
        session.run_prefill([text])
        got = session.run_decode().texts[0]
        b = session.get_benchmark_info()  # the engine's own token counts and timings
    finally:
        session.close()
        engine.close()
    on_text(got)
    n_pre, n_dec = b.last_prefill_token_count, b.last_decode_token_count
    pre_s = n_pre / max(b.last_prefill_tokens_per_second, 1e-9)
    dec_s = n_dec / max(b.last_decode_tokens_per_second, 1e-9)
    return {"prompt_tokens": n_pre, "generated_tokens": n_dec, "tokens": None,
            "prefill_ms": pre_s * 1000, "decode_ms": dec_s * 1000,
            "prefill_tok_s": b.last_prefill_tokens_per_second, "decode_tok_s": b.last_decode_tokens_per_second,
            "runtime": f"LiteRT-LM engine (litert_lm {_version('litert-lm-api')})", "text": got}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
