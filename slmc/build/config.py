"""slmc.toml: what an app builds (models, and per platform the artifacts), typed and validated.

The schema is the dataclasses below; every table may hold only their fields. A bad key or
value is one line naming the key (`slmc.toml: platforms.android.artifacts[0].backend: ...`),
exit 2. Relative paths are relative to the folder holding slmc.toml. Nothing here imports
torch: `slmc build` must answer "nothing to do" fast.

    [models.chat]
    path = "default"            # an HF folder, a .gguf, an IR folder, or "default"
    sha256 = "3f1c..."           # optional pin of the model's files (`slmc build` prints it)

    [platforms.android]
    out = "build/slmc/android"   # one folder per artifact inside it

    [[platforms.android.artifacts]]
    name = "chat-et"             # the artifact's folder: <out>/<name>
    model = "chat"
    target = "executorch"
    backend = "xnnpack"
    recipe = "int8da-int4w-g32"
    passes = []                  # "name:k=v,..." after the recipe's
    max_seq_len = 512
    kv = { dtype = "float32" }   # kv.cache options: layout, dtype, window, sink_tokens, arena
    validate = true              # run `slmc validate` before the artifact is accepted
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SlmcError

PLATFORMS = ("android", "ios", "host")
TARGETS_DIR = Path(__file__).resolve().parents[1] / "targets"


@dataclass(frozen=True)
class KVSpec:
    """The kv.cache pass's options (slmc/passes/kv_cache.py); empty: the model's own."""
    layout: str = ""  # bhsd | bshd
    dtype: str = ""  # float32 | float16 | int8
    window: int = 0  # > 0: a ring buffer of this many positions
    sink_tokens: int = 0
    arena: bool = False

    def pass_spec(self) -> str | None:
        opts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}
        if not opts:
            return None
        return "kv.cache:" + ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                      for k, v in opts.items())


@dataclass(frozen=True)
class ModelSpec:
    path: str  # HF folder, .gguf, IR folder (relative to slmc.toml) or "default"
    sha256: str | None = None  # the model files' digest (slmc/build/digest.py); a mismatch fails the build


@dataclass(frozen=True)
class ArtifactSpec:
    name: str  # folder name inside the platform's out
    model: str  # a key of [models]
    target: str  # executorch | tflite | coreml | onnx
    backend: str | None = None  # None: the target's default
    recipe: str | None = None
    passes: tuple[str, ...] = ()
    calib: tuple[str, ...] = ()  # calibration texts for data-aware passes (relative to slmc.toml)
    max_seq_len: int | None = None
    kv: KVSpec = field(default_factory=KVSpec)
    validate: bool = True


@dataclass(frozen=True)
class PlatformSpec:
    out: str  # output folder (relative to slmc.toml)
    artifacts: tuple[ArtifactSpec, ...] = ()


@dataclass(frozen=True)
class BuildConfig:
    path: Path  # the slmc.toml read
    models: dict[str, ModelSpec]
    platforms: dict[str, PlatformSpec]

    @property
    def root(self) -> Path:
        return self.path.parent

    def resolve(self, p: str) -> Path:
        return (self.root / p).resolve()


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def target_names() -> list[str]:
    """The target packages, read from the folder (importing them would import torch)."""
    return sorted(p.name for p in TARGETS_DIR.iterdir() if (p / "__init__.py").is_file())


class _Reader:
    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, msg: str):
        raise SlmcError(msg, f"{self.where}: {key}")

    def table(self, obj, key: str, cls) -> dict:
        """`obj` checked against `cls`'s fields: unknown keys, missing required ones, types."""
        if not isinstance(obj, dict):
            self.fail(key, f"must be a table, not {type(obj).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for k in obj:
            if k not in fields:
                self.fail(f"{key}.{k}", f"unknown key; known: {', '.join(fields)}")
        for f in fields.values():
            if f.name not in obj and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(f"{key}.{f.name}", "missing (required)")
        return obj

    def value(self, obj: dict, key: str, name: str, kind, default=None):
        if name not in obj:
            return default
        v = obj[name]
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            self.fail(f"{key}.{name}", f"must be an integer, not {v!r}")
        if kind is bool and not isinstance(v, bool):
            self.fail(f"{key}.{name}", f"must be true or false, not {v!r}")
        if kind is str and not isinstance(v, str):
            self.fail(f"{key}.{name}", f"must be a string, not {v!r}")
        if kind is tuple:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                self.fail(f"{key}.{name}", f"must be a list of strings, not {v!r}")
            v = tuple(v)
        return v


def parse(text: str, path: Path) -> BuildConfig:
    where = path.name
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SlmcError(f"not valid TOML ({e})", where) from None
    r = _Reader(where)
    for k in data:
        if k not in ("models", "platforms"):
            r.fail(k, "unknown key; known: models, platforms")
    models = {}
    if not isinstance(data.get("models", {}), dict):
        r.fail("models", "must be a table ([models.NAME])")
    for name, m in data.get("models", {}).items():
        key = f"models.{name}"
        r.table(m, key, ModelSpec)
        sha = r.value(m, key, "sha256", str)
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            r.fail(f"{key}.sha256", f"must be 64 lowercase hex digits, not {sha!r}")
        models[name] = ModelSpec(path=r.value(m, key, "path", str), sha256=sha)
    if not models:
        r.fail("models", "missing: declare at least one model ([models.NAME] with path = ...)")
    if not isinstance(data.get("platforms"), dict) or not data["platforms"]:
        r.fail("platforms", f"missing: declare at least one of {', '.join(PLATFORMS)} ([platforms.NAME])")
    targets = target_names()
    platforms = {}
    for pname, p in data["platforms"].items():
        key = f"platforms.{pname}"
        if pname not in PLATFORMS:
            r.fail(key, f"unknown platform; known: {', '.join(PLATFORMS)}")
        r.table(p, key, PlatformSpec)
        arts, seen = [], set()
        if not isinstance(p.get("artifacts", []), list):
            r.fail(f"{key}.artifacts", "must be an array of tables ([[platforms.NAME.artifacts]])")
        for i, a in enumerate(p.get("artifacts", [])):
            akey = f"{key}.artifacts[{i}]"
            arts.append(_artifact(r, a, akey, models, targets, seen))
        if not arts:
            r.fail(f"{key}.artifacts", "empty: declare at least one [[platforms.NAME.artifacts]]")
        platforms[pname] = PlatformSpec(out=r.value(p, key, "out", str), artifacts=tuple(arts))
    return BuildConfig(path=path.resolve(), models=models, platforms=platforms)


def _artifact(r: _Reader, a, akey: str, models: dict, targets: list, seen: set) -> ArtifactSpec:
    from ..recipes import RECIPES

    r.table(a, akey, ArtifactSpec)
    name = r.value(a, akey, "name", str)
    if not _NAME.match(name) or name in seen:
        r.fail(f"{akey}.name", f"{name!r} must be a unique folder name (letters, digits, . _ -)")
    seen.add(name)
    model = r.value(a, akey, "model", str)
    if model not in models:
        r.fail(f"{akey}.model", f"{model!r} is not a key of [models] ({', '.join(models)})")
    target = r.value(a, akey, "target", str)
    if target not in targets:
        r.fail(f"{akey}.target", f"unknown target {target!r}; known: {', '.join(targets)}")
    recipe = r.value(a, akey, "recipe", str)
    backend = r.value(a, akey, "backend", str)
    if recipe is not None:
        if recipe not in RECIPES:
            r.fail(f"{akey}.recipe", f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        if backend is not None and not RECIPES[recipe].legal_for(target, backend):
            r.fail(f"{akey}.recipe", f"{recipe} is built for {', '.join(RECIPES[recipe].flows)}, "
                                     f"not {target}:{backend}")
    msl = r.value(a, akey, "max_seq_len", int)
    if msl is not None and msl < 2:
        r.fail(f"{akey}.max_seq_len", f"must be at least 2, not {msl}")
    kv = KVSpec()
    if "kv" in a:
        kvt = r.table(a["kv"], f"{akey}.kv", KVSpec)
        kinds = {"str": str, "int": int, "bool": bool}  # the annotations are strings (future import)
        kv = KVSpec(**{f.name: r.value(kvt, f"{akey}.kv", f.name, kinds[f.type], f.default)
                       for f in dataclasses.fields(KVSpec)})
    for p in r.value(a, akey, "passes", tuple, ()):
        if not re.match(r"^[a-z_]+\.[a-z_0-9]+(:.*)?$", p):
            r.fail(f"{akey}.passes", f"{p!r} is not NAME[:k=v,...]")
    return ArtifactSpec(name=name, model=model, target=target, backend=backend, recipe=recipe,
                        passes=r.value(a, akey, "passes", tuple, ()), calib=r.value(a, akey, "calib", tuple, ()),
                        max_seq_len=msl, kv=kv, validate=r.value(a, akey, "validate", bool, True))


def load(path: str | Path) -> BuildConfig:
    path = Path(path)
    if not path.is_file():
        raise SlmcError("no such file (write an slmc.toml: see README, 'Building in your app')", str(path))
    return parse(path.read_text(), path)
