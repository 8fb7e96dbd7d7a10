"""The `qemu-arm64` device: an arm64 Debian root filesystem with the runtimes slmc targets,
run under qemu-user on this host (no arm64 hardware, no VM, no network in it).

`setup()` builds it from Debian's packages (debootstrap) and PyPI's aarch64 wheels only, in
a cache folder named by a content hash of what it installs (so a second call is a no-op).
As root the device runs programs in a chroot of that folder (`os.chroot`, then
qemu-aarch64-static inside it: no binfmt_misc registration needed); otherwise with
`qemu-aarch64-static -L ROOTFS`, which maps absolute paths into the root filesystem.
/proc is never mounted: XNNPACK would read the host's x86 /proc/cpuinfo and crash; a
Cortex-A76's cpuinfo and sysfs CPU files are written instead, and qemu emulates that CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import SlmcError
from .base import Device, RunResult, register

NAME = "qemu-arm64"
QEMU = "qemu-aarch64-static"
CPU = "cortex-a76"  # the big core of a 2019-2021 phone (Snapdragon 855/865/888-era)
SUITE, MIRROR = "bookworm", os.environ.get("SLMC_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN = ("python3", "libatomic1")
SITE, STUBS = "/opt/slmc-py", "/opt/slmc-stubs"
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
# Installed without dependency resolution (torch's would pull multi-GB CUDA wheels): the
# runtimes, and exactly the pure-Python/numpy packages their runtime imports need.
WHEELS = (
    "ai-edge-litert==2.3.0", "executorch==1.5.1", "torch==2.13.0", "onnxruntime==1.31.1", "numpy==2.4.6",
    "flatbuffers==25.12.19", "protobuf==7.36.2", "ml_dtypes==0.7.0", "tqdm==4.70.1", "backports.strenum==1.2.8",
    "typing_extensions==4.16.0", "sympy==1.14.0", "mpmath==1.3.0", "networkx==3.6.1", "jinja2==3.1.6",
    "markupsafe==3.0.4", "filelock==4.3.1", "fsspec==2026.9.0", "packaging==26.4", "ruamel.yaml==0.19.1",
    "pyyaml==6.0.4", "tabulate==0.10.0",
)
# runtime -> the import a checker needs (setup runs each under emulation and records why not)
PROBES = {
    "ai_edge_litert": "from ai_edge_litert.interpreter import Interpreter",
    "executorch": "import torch, executorch.kernels.quantized; from executorch.extension.pybindings import _C",
    "onnxruntime": "import onnxruntime",
}
CPUINFO = ("processor\t: 0\nBogoMIPS\t: 38.40\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
           "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
           "CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n")
FAKE_FILES = {"proc/cpuinfo": CPUINFO, "sys/devices/system/cpu/possible": "0\n",
              "sys/devices/system/cpu/present": "0\n", "sys/devices/system/cpu/online": "0\n",
              "sys/devices/system/cpu/cpu0/regs/identification/midr_el1": "0x00000000414fd0b1\n"}
TOOLS = {QEMU: "qemu-user-static", "debootstrap": "debootstrap", "aarch64-linux-gnu-ld": "binutils-aarch64-linux-gnu",
         "readelf": "binutils"}


def cache_root() -> Path:
    return Path(os.environ.get("SLMC_CACHE", Path.home() / ".cache" / "slmc")) / "devices"


def content_hash() -> str:
    """What the root filesystem holds: the Debian suite and packages, the wheels, the CPU
    files, the stub builder and this module's run conventions."""
    spec = {"suite": SUITE, "debian": DEBIAN, "wheels": WHEELS, "platforms": PLATFORMS, "files": FAKE_FILES,
            "probes": PROBES, "site": SITE, "stubs": STUBS, "stub_builder": hashlib.sha256(
                Path(__file__).with_name("stubs.py").read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def device_dir() -> Path:
    return cache_root() / f"{NAME}-{content_hash()}"


def _need_tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)]
    if missing:
        raise SlmcError(f"missing host tools for the arm64 emulator: apt-get install {' '.join(sorted(set(missing)))} "
                        "(or `make emulator`, which installs them as root)", "slmc device setup")


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise SlmcError(f"{what} failed (exit {r.returncode}): {' | '.join(tail)[:400]}", "slmc device setup")
    return r


def setup(progress=None) -> dict:
    """Build the root filesystem unless this content hash's one exists; returns its
    description (device.json: where, how long it took, which runtimes run and why not)."""
    step = progress or (lambda msg: None)
    final = device_dir()
    if (final / "device.json").is_file():
        return {**json.loads((final / "device.json").read_text()), "cached": True}
    _need_tools()
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    root, times = work / "rootfs", {}
    try:
        t = time.time()
        step("debootstrap (arm64, minbase)")
        _run(["debootstrap", "--arch=arm64", "--variant=minbase", "--foreign", f"--include={','.join(DEBIAN)}",
              SUITE, str(root), MIRROR], "debootstrap")
        # --foreign leaves the packages unpacked only into its cache: extracting them is all a
        # Python that never runs maintainer scripts needs (no arm64 dpkg run under emulation)
        debs = sorted((root / "var/cache/apt/archives").glob("*.deb"))
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
        for deb in debs:
            deb.unlink()
        times["debian_s"] = round(time.time() - t, 1)
        t = time.time()
        step("aarch64 wheels")
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:", "--target",
              str(root / SITE.lstrip("/")), "--python-version", "3.11", "--implementation", "cp", *platforms,
              *WHEELS], "pip install (aarch64 wheels)")
        times["wheels_s"] = round(time.time() - t, 1)
        t = time.time()
        step("CUDA library stubs")
        from .stubs import build_stubs

        stubbed = build_stubs(root, root / SITE.lstrip("/"), root / STUBS.lstrip("/"))
        for rel, text in FAKE_FILES.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        shutil.copy2(shutil.which(QEMU), root / "usr/bin" / QEMU)
        times["stubs_s"] = round(time.time() - t, 1)
        t = time.time()
        runtimes = {}
        dev = QemuArm64(root=root)
        for runtime, code in PROBES.items():
            step(f"probing {runtime} under emulation")
            r = dev.run([dev.python, "-c", code], timeout=600)
            lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
            runtimes[runtime] = None if r.returncode == 0 else \
                f"`{code}` fails under qemu-user (exit {r.returncode}): {lines[-1] if lines else ''}"[:400]
        times["probe_s"] = round(time.time() - t, 1)
        desc = {"device": NAME, "path": str(final), "hash": content_hash(), "cpu": CPU, "debian": SUITE,
                "wheels": list(WHEELS), "stubbed_libraries": stubbed, "runtimes": runtimes, "seconds": times,
                "mode": "chroot" if os.geteuid() == 0 else "qemu -L"}
        (work / "device.json").write_text(json.dumps(desc, indent=2) + "\n")
        if final.exists():  # another setup finished first: keep its copy
            shutil.rmtree(work, ignore_errors=True)
        else:
            os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {**json.loads((final / "device.json").read_text()), "cached": False}


class QemuArm64(Device):
    name = NAME
    python = "/usr/bin/python3"

    def __init__(self, arg: str | None = None, root: Path | None = None):
        if arg:
            raise SlmcError(f"{NAME} takes no argument (got {arg!r})", "--on")
        if root is None:
            d = device_dir()
            if not (d / "device.json").is_file():
                raise SlmcError(f"the {NAME} device is not set up here; run `slmc device setup {NAME}` "
                                "(or `make emulator`) first", "--on")
            self.info, root = json.loads((d / "device.json").read_text()), d / "rootfs"
        else:
            self.info = {}
        self.root = Path(root)
        # SLMC_QEMU_CHROOT=0: the unprivileged way even as root
        self.chroot = os.geteuid() == 0 and os.environ.get("SLMC_QEMU_CHROOT", "1") != "0"

    def _host(self, remote: str) -> Path:
        if not remote.startswith("/"):
            raise ValueError(f"device paths are absolute: {remote!r}")
        return self.root / remote.lstrip("/")

    def push(self, local: Path, remote: str) -> None:
        dst = self._host(remote)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).is_dir():
            shutil.copytree(local, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(local, dst)

    def pull(self, remote: str, local: Path) -> None:
        shutil.copy2(self._host(remote), local)

    def run(self, argv: list[str], cwd: str | None = None, timeout: float | None = None) -> RunResult:
        env = ["-E", f"PYTHONPATH={SITE}", "-E", f"LD_LIBRARY_PATH={STUBS}", "-E", "PYTHONDONTWRITEBYTECODE=1"]
        t = time.time()
        if self.chroot:
            root = str(self.root)
            cmd = [f"/usr/bin/{QEMU}", "-cpu", CPU, *env, *argv]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={"PATH": "/usr/bin:/bin"},
                               preexec_fn=lambda: (os.chroot(root), os.chdir(cwd or "/")))
        else:
            cmd = [shutil.which(QEMU) or QEMU, "-L", str(self.root), "-cpu", CPU, *env,
                   str(self._host(argv[0])), *argv[1:]]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               cwd=self._host(cwd) if cwd else self.root)
        return RunResult(r.returncode, r.stdout, r.stderr, round(time.time() - t, 2))

    def workdir(self) -> str:
        return f"/tmp/slmc-check-{os.getpid()}-{time.time_ns()}"

    def cleanup(self, remote: str) -> None:
        shutil.rmtree(self._host(remote), ignore_errors=True)

    def refusal(self, runtime: str) -> str | None:
        runtimes = self.info.get("runtimes", {})
        if runtime not in runtimes:
            return f"`slmc device setup {NAME}` installs no {runtime} runtime (it has: {', '.join(runtimes)})"
        return runtimes[runtime]

    def describe(self) -> str:
        return f"{NAME} ({CPU} under qemu-user, {'chroot' if self.chroot else 'qemu -L'})"


register(NAME, lambda arg: QemuArm64(arg))
