"""The on-device check bundle: what goes into every artifact's `check/` folder at compile time.

Common to every target: `check/expected.npz` (the prompt, the reference's greedy tokens
and its last-position logits for a prefill and a few decode steps), `check/bounds.json`
(the flow's acceptance bounds, fixed in advance by the target's tolerance table, and the
model files' hashes), `check/judge.py` (the comparison, numpy only) and `check/common.py`
(what every checker script shares). Each target adds,
in `targets/<name>/check.py`, its runtime's own form: a checker script that needs only
that runtime and numpy (ExecuTorch: a BundledProgram `.bpte`; Core ML: an XCTest source).

The expected outputs come from the reference executor on the compiled IR, the same
reference `slmc validate` uses; the artifact's model files are not touched.
"""

from __future__ import annotations

import importlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..compiler import reference
from ..compiler.ir import Model
from ..targets.base import Artifact, Target, file_sha256

CHECK_DIR = "check"
PROMPT = "The quick brown fox jumps over the lazy dog."
STEPS = 5  # the prefill and four decode steps: cheap on a phone and under emulation
JUDGE = Path(__file__).with_name("judge.py")
COMMON = Path(__file__).with_name("checker_common.py")  # a checker script's shared part


@dataclass
class CheckData:
    prompt: list[int]  # prefill tokens (positions 0..len-1)
    tokens: list[int]  # the reference's greedy tokens; step i >= 1 feeds tokens[i-1]
    expected: np.ndarray  # [steps, vocab] float32: the reference's logits of each step's last position
    bounds: dict  # max_abs, min_top1, greedy_equal (+ notes on how they were set)


def prompt_tokens(model: Model, tokenizer_dir: Path | None) -> list[int]:
    path = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir else None
    if path is not None and path.is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(path)).encode(PROMPT, add_special_tokens=False).ids
    else:  # no tokenizer (tiny test models): fixed pseudo-random ids, as validate does
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.vocab_size, (8,), generator=g).tolist()
    return ids[: max(1, (model.kv.max_len - 1) // 2)]


def bounds_for(model: Model, tol, prompt: list[int], tokens: list[int]) -> dict:
    """The target's fixed bound for this flow (targets/bounds.py), as a dict; never derived
    from the run. A flow without a bound gets rule "none" (its verdict is INCONCLUSIVE)."""
    if tol is None:
        return {"rule": "none", "min_top1": 1.0, "greedy_equal": True, "notes": ["this flow has no published bound"]}
    return {**asdict(tol), "notes": []}


def check_data(model: Model, tol, tokenizer_dir: Path | None, steps: int = STEPS) -> CheckData:
    prompt = prompt_tokens(model, tokenizer_dir)
    steps = max(0, min(steps, model.kv.max_len - 1 - len(prompt)))
    with torch.no_grad():
        tokens, logits = reference.greedy(model, prompt, steps)
    expected = np.stack([l.float().numpy() for l in logits]).astype(np.float32) if logits else \
        np.zeros((0, model.vocab_size), np.float32)
    return CheckData(prompt, [int(t) for t in tokens], expected, bounds_for(model, tol, prompt, tokens))


def _npz(**arrays) -> bytes:
    """np.savez's format with fixed zip timestamps, so a recompile writes the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, a in arrays.items():
            with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
    return buf.getvalue()


def check_files(target: Target, art: Artifact, manifest: dict, data: CheckData) -> dict[str, bytes]:
    """The `check/` files of this artifact: the common ones plus the target's own
    (`slmc.targets.<name>.check.check_bundle(art, manifest, data) -> {name: bytes}`)."""
    models = {n: file_sha256(b) for n, b in sorted(art.files.items())
              if not n.startswith(CHECK_DIR + "/")}
    bounds = {**data.bounds, "steps": len(data.tokens), "prompt_tokens": len(data.prompt),
              "target": target.name, "artifact": manifest["artifact"], "sha256": models}
    files = {f"{CHECK_DIR}/expected.npz": _npz(prompt=np.array(data.prompt, np.int64),
                                                 tokens=np.array(data.tokens, np.int64), logits=data.expected),
             f"{CHECK_DIR}/bounds.json": (json.dumps(bounds, indent=2) + "\n").encode(),
             f"{CHECK_DIR}/judge.py": JUDGE.read_bytes(), f"{CHECK_DIR}/common.py": COMMON.read_bytes()}
    package = type(target).__module__.rpartition(".")[0]
    try:
        own = importlib.import_module(f"{package}.check")
    except ModuleNotFoundError:
        own = None
    if own is not None:
        files.update({f"{CHECK_DIR}/{n}": b for n, b in own.check_bundle(art, manifest, data).items()})
    return files

