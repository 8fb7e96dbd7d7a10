"""The target interface. A target is one package, slmc/targets/<name>/, whose class says:
`supports(ir, spec) -> why-not`, `lower(ir, spec) -> Artifact`, `quant_rules(spec)`, its
`tolerances`, `open_session(folder, manifest)` (run by `run`, `validate`, `eval`) and
`readback(ir, artifact)` (are slmc's codes in the artifact unchanged?).

Targets are registered by name with a typed spec (registry.py). `lower` returns each file as
bytes in memory or, for the large ones, as a finished file in this process's scratch folder
(`scratch_file`), so the artifact's weights are not held in RAM while the rest is built;
`write_artifact` is the one place that touches the output folder, and it does so
atomically (temp folder, then rename), so a failed compile leaves nothing behind.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from ..compiler.ir import Model
from ..compiler.spill import page_out_weights  # noqa: F401  re-exported for the targets
from ..compiler.lowering.export import max_chunk
from ..errors import SlmcError, UnsupportedError
from ..manifest import read_manifest, write_manifest  # noqa: F401  read_manifest: re-exported
from .bounds import Tolerance, weight_kind
from .readback import Readback


@dataclass(frozen=True)
class TargetSpec:
    backend: str

    @property
    def backend_name(self) -> str:
        """The backend without options (a spec class may read `NAME:k=v,...` options)."""
        return self.backend


@dataclass
class Artifact:
    # name -> content, written at the boundary only; a name may be a relative path
    # ("model.mlpackage/Data/...") for artifacts that are folders. A Path is a finished file in
    # the scratch folder (scratch_file), moved into the artifact by write_artifact.
    files: dict[str, bytes | Path]
    manifest: dict = field(default_factory=dict)


_SCRATCH: list[Path] = []


def scratch_file(name: str) -> Path:
    """A fresh path for an artifact file written before the artifact is (TMPDIR picks the
    disk); the folder is removed when the process exits, so a failed compile leaves nothing."""
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix="slmc-artifact-")))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    d = Path(tempfile.mkdtemp(dir=_SCRATCH[0]))
    return d / Path(name).name




def file_size(data: bytes | Path) -> int:
    return data.stat().st_size if isinstance(data, Path) else len(data)


def file_sha256(data: bytes | Path) -> str:
    """sha256 of an artifact file's content; a file is read in 1 MiB chunks."""
    if not isinstance(data, Path):
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    with open(data, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Intermediates:
    """One runtime's view of a prompt (slmc diff): the debug variant's hidden states."""
    states: torch.Tensor  # [depths + 2, T, hidden]: embedding, after each depth, final norm
    logits: torch.Tensor  # [T, vocab]
    runtime: str
    how: str  # how the runtime was made to show them


class Session(Protocol):
    """An artifact in its own runtime: `step(tokens, start_pos) -> logits of the last
    position`, `step_all(tokens, start_pos) -> logits of every position [T, vocab]` (validate
    compares every prefill row), and `reset()` to an empty KV cache. A program that returns only
    its last row (ExecuTorch's runner convention, LiteRT's decode signature) serves step_all one
    token per call; one that returns every row (Core ML, ONNX) in one call."""

    runtime: str

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor: ...

    def step_all(self, tokens: list[int], start_pos: int) -> torch.Tensor: ...

    def reset(self) -> None: ...


class Target(ABC):
    name: str
    backends: tuple[str, ...]
    spec_class: type[TargetSpec] = TargetSpec
    # The manifest "format" values this target writes (a session is found by them too).
    formats: tuple[str, ...] = ()
    # (backend, weight kind) -> the acceptance bound (bounds.py); absent: no published bound
    # (validate's verdict is then INCONCLUSIVE)
    tolerances: ClassVar[dict[tuple[str, str], Tolerance]] = {}
    # Backends whose artifacts this host can run (and so validate); the flow suite
    # compiles and validates each one. Others compile but are checked differently.
    host_backends: tuple[str, ...] = ()
    # Passes (by registered name) this target wants after the user's passes.
    default_passes: tuple[str, ...] = ()

    @abstractmethod
    def supports(self, model: Model, spec: TargetSpec) -> str | None:
        """None if the target can hold this model under this spec, else the reason why not."""

    @abstractmethod
    def lower(self, model: Model, spec: TargetSpec, progress=None) -> Artifact: ...

    def quant_rules(self, spec: TargetSpec):
        """The QuantRules (targets/quant_rules.py) of this spec; None: no quantized storage."""
        return None

    def tolerance_key(self, manifest: dict) -> str:
        """What the tolerance table is keyed by besides the weight kind: the backend."""
        return str(manifest.get("backend")).partition(":")[0]

    def tolerance(self, manifest: dict) -> Tolerance | None:
        return self.tolerances.get((self.tolerance_key(manifest), weight_kind(manifest)))

    @abstractmethod
    def open_session(self, folder: Path, manifest: dict) -> Session:
        """The artifact in `folder` in its runtime, on this host."""

    @abstractmethod
    def readback(self, model: Model, artifact: Path) -> Readback:
        """Which of `model`'s QuantWeights the artifact file/package does not hold unchanged."""

    def hidden_states(self, model: Model, manifest: dict, ids: list[int]) -> Intermediates:
        """The hidden states of prompt `ids` (positions 0..T-1) in this target's runtime, from a
        debug variant of the artifact compiled from `model` with the manifest's spec."""
        raise UnsupportedError(f"the {self.name} target cannot show its hidden states (slmc diff)", self.name)


def check_backend(target: Target, spec: TargetSpec) -> None:
    if spec.backend_name not in target.backends:
        raise SlmcError(f"unknown backend {spec.backend!r} for target {target.name}; available: "
                        f"{', '.join(target.backends)}", "--backend")


def check_supported(target: Target, model: Model, spec: TargetSpec) -> None:
    check_backend(target, spec)
    why = target.supports(model, spec)
    if why:
        raise UnsupportedError(why, f"{target.name}/{spec.backend}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")


def check_output_path(out: Path) -> None:
    """Refuse, before any work, an output that could not or must not be written."""
    if out.exists() and not out.is_dir():
        raise SlmcError("output path exists and is a file, not a folder", str(out))
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise SlmcError("output folder exists, is not empty and is not an slmc artifact; "
                        "refusing to overwrite it", str(out))
    # the output (and any missing parents) will be made in the nearest existing ancestor
    anc = next((a for a in Path(os.path.abspath(out)).parents if a.exists()), None)
    if anc is not None and not anc.is_dir():
        raise SlmcError(f"cannot make the output folder: {anc} is a file, not a folder", str(out))
    if anc is not None and not os.access(anc, os.W_OK | os.X_OK):
        raise SlmcError(f"cannot make the output folder: no permission to write in {anc}", str(out))


def write_artifact(art: Artifact, out: Path, tokenizer_dir: Path | None) -> Path:
    """Write files + tokenizer + manifest.json into `out` atomically."""
    out = Path(out)
    check_output_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; an artifact is readable like any other output
    except OSError as e:
        raise SlmcError(f"cannot make the output folder ({e.strerror or e})", str(out)) from None
    try:
        for name, data in art.files.items():
            path = tmp / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"artifact file name {name!r} leaves the artifact folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, Path):  # a scratch file: moved (renamed where on the same disk)
                shutil.move(data, path)
            else:
                path.write_bytes(data)
        copied = []
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, tmp / name)
                    copied.append(name)
        write_manifest(tmp, art.manifest, copied, art.files)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rename(out, old / "a")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, permissions changed under us ...: nothing is left behind
            raise SlmcError(f"cannot write the artifact ({e.strerror or e})", str(out)) from None
        raise
    return out


def cache_axes(model: Model, v_columns: bool) -> dict:
    """A per-layer cache's axes for the manifest: K's, and V's (by column, or as K's)."""
    rows = "max_len" if model.kv.window is None else f"window={model.kv.window}"
    return {"axes": f"[1, {rows}, kv_heads, head_dim]" if model.kv.layout == "bshd"
            else f"[1, kv_heads, {rows}, head_dim]",
            "v_axes": "[1, kv_heads, head_dim, max_len]" if v_columns else "as axes"}


def ring_manifest(model: Model) -> dict:
    """How a ring-buffer cache maps positions to slots, for the app's runtime ({} without one)."""
    kv = model.kv
    if kv.window is None:
        return {}
    return {"ring": {"slots": kv.window, "sink_tokens": kv.sink_tokens,
                     "slot_of_position": f"p if p < {kv.sink_tokens} else {kv.sink_tokens} + "
                                         f"(p - {kv.sink_tokens}) mod {kv.window - kv.sink_tokens}",
                     "attends_to": f"the {kv.sink_tokens} sink positions and the last "
                                   f"{kv.window - kv.sink_tokens} positions",
                     "max_tokens_per_call": max_chunk(model),
                     "max_positions": kv.max_len}}


def kv_refusal(model: Model, how: str, dtypes: tuple[str, ...] = ("float32", "float16"),
               ring: str | None = "every position keeps its own slot; use a max length instead",
               arena: str = "per-layer caches are") -> str | None:
    """Why a target's cache (`how`: buffers, states, signature I/O) cannot hold this KV spec.
    ring: why it cannot hold a ring buffer, or None where the shared lowering's ring is used."""
    kv = model.kv
    if kv.dtype not in dtypes:
        return (f"a {kv.dtype} KV cache is not lowered for {how} (slmc lowers {'/'.join(dtypes)} caches "
                "there; int8 caches with per-token scales exist for ExecuTorch buffers without expert "
                "offload and for LiteRT signature I/O)")
    if kv.window is not None and ring:
        return f"a ring-buffer KV cache (window={kv.window}, sinks={kv.sink_tokens}) is not lowered for {how}: {ring}"
    if kv.arena:
        return f"an arena KV cache (one buffer, per-layer views) is not lowered for {how}: {arena}"
    return None
