"""A device: somewhere an artifact's check runs, reached by `push`, `run` and `pull`.

Transports register a factory by name (`register`); `slmc.device.get_device("NAME[:ARG]")` makes one:
`qemu-arm64` (the arm64 root filesystem `slmc device setup qemu-arm64` builds, run under
qemu-user) and `adb[:SERIAL]` (an Android phone) ship here; another transport is one
module that subclasses `Device` and registers itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import SlmcError


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class Device(ABC):
    name: str
    # the Python on the device that runs a checker script
    python: str = "python3"

    @abstractmethod
    def push(self, local: Path, remote: str) -> None:
        """Copy a local file or folder to `remote` (an absolute path on the device)."""

    @abstractmethod
    def run(self, argv: list[str], cwd: str | None = None, timeout: float | None = None) -> RunResult:
        """Run a command on the device."""

    @abstractmethod
    def pull(self, remote: str, local: Path) -> None:
        """Copy a file from the device."""

    def workdir(self) -> str:
        """A fresh folder on the device for one check (removed by `cleanup`)."""
        return "/data/local/tmp/slmc-check"

    def cleanup(self, remote: str) -> None:
        self.run(["rm", "-rf", remote])

    def refusal(self, runtime: str) -> str | None:
        """Why this device cannot run `runtime` (None: it can, as far as slmc knows)."""
        return None

    def describe(self) -> str:
        return self.name


DEVICES: dict[str, Callable[[str | None], Device]] = {}


def register(name: str, factory: Callable[[str | None], Device]) -> None:
    DEVICES[name] = factory
