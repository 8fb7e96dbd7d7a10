"""Run an artifact in its own runtime, one step at a time.

A session exposes `step(tokens, start_pos) -> logits of the last position` and
`reset()` (targets/base.py: Session). The target that wrote the artifact opens it.
"""

from __future__ import annotations

from pathlib import Path

from ..targets import Session, target_of


def open_session(folder: Path, manifest: dict) -> Session:
    return target_of(manifest, folder).open_session(Path(folder), manifest)
