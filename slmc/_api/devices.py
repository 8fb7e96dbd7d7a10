"""device: set up an emulated device (slmc/device/)."""

from __future__ import annotations

from ..errors import SlmcError


def device_setup(name: str, progress=None) -> dict:
    """Build (once; cached by content hash) the named device's root filesystem and runtimes;
    returns its description: path, seconds per stage, which runtimes run there and why not."""
    if name != "qemu-arm64":
        raise SlmcError(f"no setup for device {name!r}: `slmc device setup` builds qemu-arm64 "
                        "(an adb phone needs no setup from slmc)", "slmc device setup")
    from ..device import qemu

    return qemu.setup(progress)
