"""Text generation with an artifact in its own app-side runtime.

Each platform's stock runner, unmodified, where it is installed: if it works here, it works in
an app that embeds the same runner.
  .pte        ExecuTorch's `TextLLMRunner`
  .litertlm   LiteRT-LM's engine (`litert_lm.Engine`, PyPI litert-lm-api), greedy as top-k 1
  onnx        onnxruntime-genai's generator (`og.Model` on the folder's genai_config.json)
Every other artifact kind (Core ML, ExecuTorch expert offload), or one whose runner is not
installed, runs in its target's session, the same one `slmc validate` uses; the stats say which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..errors import SlmcError
from ..manifest import read_manifest


def chat_prompt(folder: Path, prompt: str) -> str:
    """Render the tokenizer's chat template for one user turn (no template: as is)."""
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if not isinstance(template, str):
        return prompt
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=[{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, bos_token="", eos_token="")


def generate(folder: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, chat: bool = True,
             on_text: Callable[[str], None] = lambda s: None) -> dict:
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not (folder / "tokenizer.json").is_file():
        raise SlmcError("artifact has no tokenizer.json; the runner needs one", str(folder))
    text = chat_prompt(folder, prompt) if chat else prompt
    fmt = manifest.get("format")
    litertlm = (manifest.get("litertlm") or {}).get("file")
    if fmt == "onnx" and _installed("onnxruntime_genai"):
        from .stock_runners import genai_generate

        return genai_generate(folder, manifest, text, max_new_tokens, temperature, on_text)
    if fmt == "tflite" and litertlm and (folder / litertlm).is_file() and _installed("litert_lm"):
        from .stock_runners import litert_lm_generate

        return litert_lm_generate(folder / litertlm, manifest, text, max_new_tokens, temperature, on_text)
    if fmt != "pte":
        return session_generate(folder, manifest, text, max_new_tokens, temperature, on_text)
    import executorch.kernels.quantized  # noqa: F401  registers quantized kernels
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    data = manifest.get("data_file")  # a tied table kept beside the .pte (targets/executorch/program.py)
    runner = TextLLMRunner(str(folder / manifest["artifact"]), str(folder / "tokenizer.json"),
                           str(folder / data) if data else None)
    got: dict = {}

    def on_stats(s):
        got.update(prompt_tokens=s.num_prompt_tokens, generated_tokens=s.num_generated_tokens,
                   prefill_ms=s.prompt_eval_end_ms - s.inference_start_ms,
                   decode_ms=s.inference_end_ms - s.prompt_eval_end_ms)

    pieces: list[str] = []

    def on_token(t: str) -> None:
        pieces.append(t)
        on_text(t)

    # warming=True: the C++ runner then leaves stdout to us (it printf's every token
    # otherwise, which would print the text twice); callbacks and stats are unchanged.
    cfg = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=temperature, num_bos=0,
                           warming=True)
    runner.generate(text, cfg, token_callback=on_token, stats_callback=on_stats)
    got["prefill_tok_s"] = got.get("prompt_tokens", 0) / max(got.get("prefill_ms", 0), 1) * 1000
    got["decode_tok_s"] = got.get("generated_tokens", 0) / max(got.get("decode_ms", 0), 1) * 1000
    got["runtime"] = "executorch TextLLMRunner"
    got["text"] = "".join(pieces)
    return got


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def session_generate(folder: Path, manifest: dict, text: str, max_new_tokens: int, temperature: float,
                     on_text: Callable[[str], None]) -> dict:
    """Generate with the artifact's session (targets/<name>/session.py): prefill the prompt, then
    one token per step until an EOS id, `max_new_tokens`, or the KV cache is full. No BOS is
    added, as with the stock runner (num_bos=0). temperature > 0 samples with a fixed seed."""
    import time

    import torch
    from tokenizers import Tokenizer

    from .sessions import open_session

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    room = int(manifest["kv_cache_spec"]["max_len"]) - 1  # positions the exported programs take
    if not ids or len(ids) >= room:
        raise SlmcError(f"the prompt is {len(ids)} tokens; this artifact's KV cache takes 1..{room - 1} "
                        "(compile with a larger --max-seq-len)", str(folder))
    session = open_session(folder, manifest)
    eos = set((manifest.get("model") or {}).get("eos_ids") or [])
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    logits = session.step(ids, 0)
    t1 = time.perf_counter()
    out: list[int] = []
    shown = ""
    while len(out) < min(max_new_tokens, room - len(ids)):
        if temperature > 0:
            nxt = int(torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        if nxt in eos:
            break
        out.append(nxt)
        now = tok.decode(out)
        if not now.endswith("\ufffd"):  # a byte-level token may end inside a character
            on_text(now[len(shown):])
            shown = now
        if len(out) < min(max_new_tokens, room - len(ids)):
            logits = session.step([nxt], len(ids) + len(out) - 1)
    t2 = time.perf_counter()
    decoded = tok.decode(out)
    if decoded != shown:
        on_text(decoded[len(shown):])
    return {"prompt_tokens": len(ids), "generated_tokens": len(out), "tokens": out,
            "prefill_ms": (t1 - t0) * 1000, "decode_ms": (t2 - t1) * 1000,
            "prefill_tok_s": len(ids) / max(t1 - t0, 1e-9), "decode_tok_s": len(out) / max(t2 - t1, 1e-9),
            "runtime": f"slmc's {getattr(session, 'runtime', manifest.get('format'))} session "
                       f"(no stock runner for {manifest.get('format')} artifacts here)",
            "text": decoded}
