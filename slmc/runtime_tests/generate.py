"""Text generation with an artifact in its own app-side runtime.

For `.pte` this is ExecuTorch's stock `TextLLMRunner`, unmodified: if it works
here, it works in an app that embeds the same runner.
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
    if manifest.get("format") != "pte":
        raise SlmcError(f"`slmc run` supports .pte artifacts; this one is {manifest.get('format')}", str(folder))
    if not (folder / "tokenizer.json").is_file():
        raise SlmcError("artifact has no tokenizer.json; the runner needs one", str(folder))
    import executorch.kernels.quantized  # noqa: F401  registers quantized kernels
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    text = chat_prompt(folder, prompt) if chat else prompt
    runner = TextLLMRunner(str(folder / manifest["artifact"]), str(folder / "tokenizer.json"))
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
