"""Link-time stand-ins for the CUDA libraries that PyPI's aarch64 torch wheels link.

torch >= 2.11 on aarch64 is published only as a CUDA build, and ExecuTorch's pybindings
link libtorch, so `import executorch` needs libcudart, libcudnn, libcupti, ... to be
loadable, though nothing on a phone's CPU path calls them. Each missing library becomes a
tiny aarch64 shared object with the same soname, the symbol versions its users ask for
(a version script) and every symbol they import from it, each a function returning 0.
The host's `readelf` reads the wheels' ELF files; `aarch64-linux-gnu-ld` links the stubs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import SlmcError

_LIB_DIRS = ("usr/lib/aarch64-linux-gnu", "lib/aarch64-linux-gnu", "usr/lib", "lib")


def _readelf(path: Path) -> str:
    return subprocess.run(["readelf", "-d", "-V", "--dyn-syms", "--wide", str(path)],
                          capture_output=True, text=True).stdout


def missing_libraries(rootfs: Path, site: Path) -> dict[str, set[str]]:
    """soname -> the symbols (name@version; `@version` alone for a version asked for
    without symbols) that the ELF files under `site` import from it, for each NEEDED
    library found neither in the root filesystem nor among the wheels."""
    libs = [p for p in site.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    have = {p.name for d in _LIB_DIRS if (rootfs / d).is_dir() for p in (rootfs / d).glob("*.so*")}
    have |= {p.name for p in site.rglob("*.so*")}
    needed: dict[str, set[str]] = {}
    texts = {}
    for so in libs:
        txt = texts[so] = _readelf(so)
        for name in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", txt):
            if name not in have:
                needed.setdefault(name, set())
    versions: dict[str, str] = {}  # version name -> the missing soname that defines it
    for txt in texts.values():
        cur = None
        for line in txt.splitlines():
            if m := re.search(r"File: (\S+)\s+Cnt:", line):
                cur = m.group(1)
            elif (m := re.search(r"Name: (\S+)\s+Flags:", line)) and cur in needed:
                versions[m.group(1)] = cur
                needed[cur].add(f"@{m.group(1)}")
    # what the wheels' and the system's libraries define (libstdc++'s unversioned imports ...)
    system = [p for d in _LIB_DIRS if (rootfs / d).is_dir() for p in (rootfs / d).glob("*.so*")
              if p.is_file() and not p.is_symlink()]
    defined = {m for txt in [*texts.values(), *map(_readelf, system)]
               for m in re.findall(r"(?:FUNC|OBJECT|IFUNC)\s+(?:GLOBAL|WEAK)\s+DEFAULT\s+\d+ (\S+?)(?:@|\s|$)", txt)}
    for txt in texts.values():
        for name, ver in re.findall(r"\sUND (\S+?)@(\S+)", txt):
            if ver in versions:
                needed[versions[ver]].add(f"{name}@{ver}")
        # unversioned imports (libcusparseLt, libnccl, ...): given to each unversioned missing
        # library this file needs, unless a wheel's own library defines them
        plain = [n for n in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", txt)
                 if n in needed and not any(v == n for v in versions.values())]
        if plain:
            for name in re.findall(r"GLOBAL\s+DEFAULT\s+UND (\S+?)\s*$", txt, re.M):
                if "@" not in name and name not in defined:
                    for n in plain:
                        needed[n].add(name + "@")
    return needed


def build_stubs(rootfs: Path, site: Path, out: Path) -> list[str]:
    """Write one stub per missing library into `out`; returns their sonames."""
    if not shutil.which("aarch64-linux-gnu-ld") or not shutil.which("aarch64-linux-gnu-as"):
        raise SlmcError("aarch64 binutils are missing (apt-get install binutils-aarch64-linux-gnu)",
                        "slmc device setup")
    out.mkdir(parents=True, exist_ok=True)
    needed = missing_libraries(rootfs, site)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for soname, symbols in sorted(needed.items()):
            by_version: dict[str, list[str]] = {}  # "" : unversioned imports
            for sym in sorted(symbols):
                name, _, ver = sym.partition("@")
                by_version.setdefault(ver, []).append(name)
            plain = [n for n in by_version.pop("", []) if n]
            for i, ns in enumerate(by_version.values()):  # a version without symbols still needs a node
                ns[:] = [n for n in ns if n] or [f"slmc_stub_version_{i}"]
            names = sorted({n for ns in by_version.values() for n in ns} | set(plain)) or ["slmc_stub"]
            # every imported function returns 0 (none is called on the CPU path)
            asm = ".text\n" + "".join(f".globl {n}\n.type {n},%function\n{n}:\n mov x0, #0\n ret\n" for n in names)
            (t / "s.S").write_text(asm)
            vmap = "".join(f"{v} {{ global: {'; '.join(ns)}; }};\n" for v, ns in by_version.items())
            vmap = vmap or "{ global: *; };\n"
            (t / "v.map").write_text(vmap)
            for cmd in (["aarch64-linux-gnu-as", str(t / "s.S"), "-o", str(t / "s.o")],
                        ["aarch64-linux-gnu-ld", "-shared", "-soname", soname, "--version-script",
                         str(t / "v.map"), str(t / "s.o"), "-o", str(out / soname)]):
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    raise SlmcError(f"could not link a stub for {soname}: {r.stderr.strip()[:300]}",
                                    "slmc device setup")
    return sorted(needed)
