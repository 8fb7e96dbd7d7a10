"""The `adb[:SERIAL]` device: an Android phone over adb (push, `adb shell`, pull).

The checker scripts need a Python on the phone with numpy and the artifact's runtime (for
example Termux's python with the runtime's aarch64 wheel); `SLMC_ADB_PYTHON` names it
(default `python3`). Without adb, without a connected device, or with a serial that is not
connected, `get_device` fails with one line saying which.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from ..errors import SlmcError
from .base import Device, RunResult, register


def _adb(args: list[str], timeout: float | None = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["adb", *args], capture_output=True, text=True, timeout=timeout)


def connected() -> list[str]:
    """Serials of the devices adb sees in the `device` state (unauthorized/offline ones excluded)."""
    r = _adb(["devices"])
    if r.returncode:
        raise SlmcError(f"`adb devices` failed: {(r.stderr or r.stdout).strip()[:200]}", "--on adb")
    rows = [l.split() for l in r.stdout.splitlines()[1:] if l.strip()]
    return [row[0] for row in rows if len(row) >= 2 and row[1] == "device"]


class Adb(Device):
    name = "adb"

    def __init__(self, serial: str | None = None):
        if not shutil.which("adb"):
            raise SlmcError("adb is not installed (apt-get install adb, or Android's platform-tools)", "--on adb")
        devices = connected()
        if not devices:
            raise SlmcError("no Android device is connected (`adb devices` lists none in the `device` state); "
                            "connect a phone with USB debugging on and authorize this host", "--on adb")
        if serial is None and len(devices) > 1:
            raise SlmcError(f"{len(devices)} devices are connected ({', '.join(devices)}); name one: --on adb:SERIAL",
                            "--on adb")
        if serial is not None and serial not in devices:
            raise SlmcError(f"device {serial!r} is not connected (connected: {', '.join(devices)})", "--on adb")
        self.serial = serial or devices[0]
        self.python = os.environ.get("SLMC_ADB_PYTHON", "python3")

    def _call(self, args: list[str], what: str, timeout: float | None = 600) -> subprocess.CompletedProcess:
        r = _adb(["-s", self.serial, *args], timeout)
        if r.returncode:
            raise SlmcError(f"adb {what} failed: {(r.stderr or r.stdout).strip()[:300]}", f"adb:{self.serial}")
        return r

    def push(self, local: Path, remote: str) -> None:
        self._call(["shell", "mkdir", "-p", shlex.quote(str(Path(remote).parent))], "mkdir")
        self._call(["push", str(local), remote], f"push {local}")

    def pull(self, remote: str, local: Path) -> None:
        self._call(["pull", remote, str(local)], f"pull {remote}")

    def run(self, argv: list[str], cwd: str | None = None, timeout: float | None = None) -> RunResult:
        line = " ".join(map(shlex.quote, argv))
        if cwd:
            line = f"cd {shlex.quote(cwd)} && {line}"
        t = time.time()
        r = _adb(["-s", self.serial, "shell", line], timeout)
        return RunResult(r.returncode, r.stdout, r.stderr, round(time.time() - t, 2))

    def workdir(self) -> str:
        return f"/data/local/tmp/slmc-check-{time.time_ns()}"

    def describe(self) -> str:
        return f"adb:{self.serial}"


register("adb", lambda arg: Adb(arg))
