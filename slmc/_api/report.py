"""write_report: the HTML report of a validation and/or diffs (runtime_tests/report.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..compiler.ir import Model
from ..errors import SlmcError
from ..manifest import read_manifest
from .diff import _artifact_ir


def write_report(path: str | Path, artifact: str | Path | None = None, validation=None, diffs=(),
                 model: Model | None = None) -> Path:
    """Write one self-contained HTML page; `artifact`'s manifest gives the pipeline, the manifest
    summary and (with `model`, else the IR rebuilt from the manifest) the size breakdown."""
    from ..runtime_tests.report import render

    manifest = None
    if artifact is not None and (Path(artifact) / "manifest.json").is_file():
        manifest = read_manifest(Path(artifact))
        model = _artifact_ir(Path(artifact), manifest, model)  # diff's IR, when it just rebuilt it
    title = f"slmc report: {artifact}" if artifact is not None else "slmc report"
    page = render(title, validation=validation, diffs=diffs, model=model, manifest=manifest)
    path = Path(path)
    try:  # whole or nothing: a temp file beside it, then rename
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, path)
    except OSError as e:
        raise SlmcError(f"cannot write the report ({e.strerror or e})", str(path)) from None
    return path
