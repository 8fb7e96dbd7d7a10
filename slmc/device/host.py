"""The `host` device: this machine, through the same push / run / pull as a phone (a
temporary folder, this Python). It runs the check bundle exactly as a device would, which
is how `--on DEVICE` reports the host-vs-device difference."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import SlmcError
from .base import Device, RunResult, register


class Host(Device):
    name = "host"

    def __init__(self, arg: str | None = None):
        if arg:
            raise SlmcError(f"host takes no argument (got {arg!r})", "--on")
        self.root = Path(tempfile.mkdtemp(prefix="slmc-host-device-"))
        self.python = sys.executable

    def _host(self, remote: str) -> Path:
        return self.root / remote.lstrip("/")

    def push(self, local: Path, remote: str) -> None:
        dst = self._host(remote)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, dst, dirs_exist_ok=True) if Path(local).is_dir() else shutil.copy2(local, dst)

    def pull(self, remote: str, local: Path) -> None:
        shutil.copy2(self._host(remote), local)

    def run(self, argv: list[str], cwd: str | None = None, timeout: float | None = None) -> RunResult:
        # device paths in the arguments live under this device's folder
        args = [argv[0]] + [str(self._host(a)) if a.startswith("/") else a for a in argv[1:]]
        t = time.time()
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                           cwd=self._host(cwd) if cwd else self.root)
        return RunResult(r.returncode, r.stdout, r.stderr, round(time.time() - t, 2))

    def workdir(self) -> str:
        return f"/check-{time.time_ns()}"

    def cleanup(self, remote: str) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


register("host", lambda arg: Host(arg))
