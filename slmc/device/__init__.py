"""Devices for on-device checks: transports (push / run / pull) and the emulator's setup."""

from __future__ import annotations

from ..errors import SlmcError
from .base import DEVICES, Device, RunResult, register
from . import adb, host, qemu  # noqa: E402,F401  the transports register themselves


def get_device(spec: str) -> Device:
    """`NAME[:ARG]` -> a Device (ARG: e.g. adb's serial)."""
    name, _, arg = spec.partition(":")
    if name not in DEVICES:
        raise SlmcError(f"unknown device {name!r}; available: {', '.join(sorted(DEVICES))}", "--on")
    return DEVICES[name](arg or None)


__all__ = ["DEVICES", "Device", "RunResult", "register", "get_device"]
