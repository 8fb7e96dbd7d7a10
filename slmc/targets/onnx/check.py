"""The ONNX artifact's on-device check: a checker script (`check/check.py`) that needs only
onnxruntime and numpy, run against the bundle's `expected.npz` (device/bundle.py)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent


def check_bundle(art, manifest: dict, data) -> dict[str, bytes]:
    return {"check.py": (_HERE / "device_check.py").read_bytes()}
