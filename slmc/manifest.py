"""The artifact manifest: the contract between slmc and every runtime and app.

`manifest.json` holds the fields every artifact has (typed below, described by the JSON
schema shipped beside this file, `manifest.schema.json`) and, at the same top level, the
target's own fields (`io`, `kv_cache`, `runner`, ...: `Manifest.details`, as the target's
`lower` returned them). This module is the one place that writes it.

`slmc_manifest` is the format version: readers accept any version up to `VERSION` (older
files may lack fields added since; they read as their defaults) and refuse newer ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import SlmcError

VERSION = 1
FILENAME = "manifest.json"
SCHEMA = Path(__file__).with_name("manifest.schema.json")


@dataclass
class Manifest:
    format: str  # pte, tflite, mlpackage, ...: how to open `artifact`
    artifact: str  # the main file or folder, relative to the artifact folder
    target: str
    backend: str
    spec: dict  # the target spec, as dataclasses.asdict gives it
    model: dict  # family, architecture, params, weight_bytes, layers, blocks, vocab, ids
    kv_cache_spec: dict  # the IR's KVSpec (max_len, dtype, layout, window, ...)
    source: dict  # where the weights came from (path, sha256, keep_codes, ...)
    pipeline: list  # one {name, options, modified, seconds, info} per pass run
    versions: dict  # slmc, python and toolchain package versions
    compile_seconds: float
    quantization: dict | None = None  # tensor count per scheme; None: all float
    recipe: str | None = None
    calibration_files: list = field(default_factory=list)  # [{path, sha256}]
    validation: dict | None = None  # the last `slmc validate` report
    tokenizer: dict | None = None  # {files: [...]} copied beside the artifact; None: none
    files: dict = field(default_factory=dict)  # name -> bytes, filled when written
    details: dict = field(default_factory=dict)  # the target's own fields (top level in JSON)
    slmc_manifest: int = VERSION

    def to_json(self) -> dict:
        """The JSON object: the target's fields and the common ones side by side (a common
        field wins over a target field of the same name, as it always has)."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}
        return {**self.details, **common}

    @classmethod
    def from_json(cls, obj: dict, where: str = FILENAME) -> Manifest:
        """Read what any slmc up to this one wrote; missing fields take their defaults."""
        if not isinstance(obj, dict):
            raise SlmcError("invalid manifest (not a JSON object)", where)
        version = obj.get("slmc_manifest", VERSION)
        if not isinstance(version, int) or version > VERSION:
            raise SlmcError(f"manifest version {version!r} is newer than this slmc reads ({VERSION})", where)
        names = {f.name for f in dataclasses.fields(cls)} - {"details"}
        missing = [n for n in ("format", "artifact") if n not in obj]
        if missing:
            raise SlmcError(f"invalid manifest (no {', '.join(missing)})", where)
        known = {k: v for k, v in obj.items() if k in names}
        defaults = {"target": "", "backend": "", "spec": {}, "model": {}, "kv_cache_spec": {}, "source": {},
                    "pipeline": [], "versions": {}, "compile_seconds": 0.0}
        return cls(**{**defaults, **known}, details={k: v for k, v in obj.items() if k not in names})

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"


@cache
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
          "boolean": bool, "null": type(None)}


def schema_errors(obj: Any, node: dict | None = None, at: str = "$") -> list[str]:
    """Where `obj` breaks the schema (the subset it uses: type, required, properties,
    items, additionalProperties). Empty: it conforms."""
    node = schema() if node is None else node
    types = node.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = any(isinstance(obj, _TYPES[t]) and not (t in ("integer", "number") and isinstance(obj, bool))
                 for t in types)
        if not ok:
            return [f"{at}: {type(obj).__name__} is not {' or '.join(types)}"]
    errs = []
    if isinstance(obj, dict):
        errs += [f"{at}: no {k!r}" for k in node.get("required", []) if k not in obj]
        props, extra = node.get("properties", {}), node.get("additionalProperties", True)
        for k, v in obj.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is not None:
                errs += schema_errors(v, sub, f"{at}.{k}")
    if isinstance(obj, list) and isinstance(node.get("items"), dict):
        for i, v in enumerate(obj):
            errs += schema_errors(v, node["items"], f"{at}[{i}]")
    return errs


def write_manifest(folder: Path, manifest: Manifest | dict, tokenizer_files: list[str], file_names) -> None:
    """Write `folder/manifest.json` with the tokenizer files copied and the size of every
    artifact file. A `Manifest` must conform to the schema (a miss is a bug in slmc); a plain
    dict is a target's own fields, written as they are (a lowered artifact without a compile)."""
    folder = Path(folder)
    tokenizer = {"files": list(tokenizer_files)} if "tokenizer.json" in tokenizer_files else None
    files = {n: (folder / n).stat().st_size for n in sorted(file_names)}
    if isinstance(manifest, Manifest):
        m = dataclasses.replace(manifest, tokenizer=tokenizer, files=files)
        errs = schema_errors(m.to_json())
        if errs:
            raise AssertionError(f"slmc wrote a manifest its own schema refuses: {'; '.join(errs[:5])}")
        text = m.dumps()
    else:
        text = json.dumps({**manifest, "tokenizer": tokenizer, "files": files}, indent=2, sort_keys=True) + "\n"
    (folder / FILENAME).write_text(text)


def read_manifest(folder: Path) -> dict:
    """The manifest of an artifact folder, as the JSON object it is."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        raise SlmcError("not an slmc artifact folder (no manifest.json)", str(folder))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SlmcError(f"invalid manifest ({e})", str(path)) from None


def load(folder: Path) -> Manifest:
    """The typed manifest of an artifact folder."""
    return Manifest.from_json(read_manifest(folder), str(Path(folder) / FILENAME))


def record_validation(folder: Path, report: dict) -> dict:
    """Store a validation report in the artifact's manifest; returns the updated JSON object."""
    obj = read_manifest(folder)
    Manifest.from_json(obj, str(Path(folder) / FILENAME))  # one this slmc can read
    obj["validation"] = report  # the rest stays as it was written, byte for byte
    (Path(folder) / FILENAME).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return obj
