"""What each job of the API takes, as frozen dataclasses (the CLI's options, typed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CompileOptions:
    model: str | Path  # HF folder, .gguf, IR folder or "default"
    target: str = "executorch"
    backend: str | None = None  # None: the target's default
    out: str | Path = "out"
    passes: tuple[str, ...] = ()  # "name[:k=v,...]": after the recipe's passes, before the target's own
    recipe: str | None = None  # a named pass list, run before `passes`
    calib: tuple[str, ...] = ()  # text files for every data-aware pass without its own calib=
    max_seq_len: int | None = None
    strict: bool = False  # NaN/Inf weights: error rather than warning
    keep_codes: bool = False  # keep a pre-quantized checkpoint's own codes
    dump_ir: str | Path | None = None  # write the IR after each pass into this folder


@dataclass(frozen=True)
class ValidateOptions:
    steps: int = 32  # free-running greedy decode steps compared
    prompt: str | None = None  # None: a fixed English sentence
    reference: str | Path | None = None  # None: the manifest's source model + its passes
    record: bool = True  # store the report in the artifact's manifest
    on: str | None = None  # run the artifact's check bundle on a device (slmc/device): qemu-arm64, adb[:SERIAL]
    positions: int = 512  # teacher-forced positions compared, at least (bounds.MIN_POSITIONS)
    long: bool = False  # windows as long as the KV cache: past every sliding window and ring wrap
    text: str | Path | None = None  # UTF-8 text to teacher-force; None: text the reference samples


@dataclass(frozen=True)
class EvalOptions:
    texts: tuple[str, ...]  # UTF-8 text files
    passes: tuple[str, ...] = ()  # applied to a model subject (not an artifact)
    window: int = 512
    stride: int = 256
    max_tokens: int = 4096
    reference: str | Path | None = None  # fp32 reference; None: the source without passes
    calib: tuple[str, ...] = ()  # calibration text for the data-aware passes (as compile's --calib)


@dataclass(frozen=True)
class InspectOptions:
    passes: tuple[str, ...] = ()
    max_seq_len: int | None = None
    keep_codes: bool = False
    save_ir: str | Path | None = None  # also save the IR folder here


@dataclass(frozen=True)
class RunOptions:
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    chat: bool = True  # apply the model's chat template


@dataclass(frozen=True)
class BuildOptions:
    config: str | Path = "slmc.toml"
    platforms: tuple[str, ...] = ()  # () : every platform in the config
    jobs: int = 1  # cache misses compiled in parallel processes
    cache: str | Path | None = None  # None: $SLMC_CACHE/build or ~/.cache/slmc/build
    depfile: str | Path | None = None  # None: slmc.d beside slmc.toml
    stamp: str | Path | None = None  # a file touched on success, the depfile's target (default slmc.lock)
    out: str | Path | None = None  # replaces the (one) platform's out folder
