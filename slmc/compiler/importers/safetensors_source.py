"""Lazy, validated access to the tensors of one or more .safetensors files.

Headers are parsed and checked up front (so a truncated or corrupt file is
reported before any work starts); tensor data is read only when a weight is
first used, by plain file reads (the OS's page cache keeps the file; the process does not map it).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ...errors import SlmcError
from ..ir import DTYPES, Weight

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "I32": "int32",
              "I64": "int64", "U8": "uint8"}
_ST_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1,
             "F64": 8, "I16": 2}


def read_header(path: Path) -> dict:
    """Parse and sanity-check a safetensors header without touching tensor data."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SlmcError("file is truncated (no header)", str(path))
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise SlmcError(f"corrupt header (claims {n} header bytes in a {size}-byte file)", str(path))
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlmcError(f"corrupt header ({e.__class__.__name__}); not a safetensors file?", str(path)) from None
    if not isinstance(header, dict):
        raise SlmcError("corrupt header (not a JSON object)", str(path))
    data_len = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = info["data_offsets"]
            shape, dtype = info["shape"], info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise SlmcError(f"corrupt header entry for {name!r}", str(path)) from None
        numel = 1
        for s in shape:
            numel *= s
        if dtype in _ST_SIZES and b - a != numel * _ST_SIZES[dtype]:
            raise SlmcError(f"tensor {name!r}: {b - a} bytes for shape {shape} {dtype}", str(path))
        end = max(end, b)
    if end > data_len:
        raise SlmcError(f"file is truncated: tensors need {end} data bytes, file has {data_len}", str(path))
    return header


class SafetensorsSource:
    """TensorSource over safetensors files: name -> lazily loaded Weight."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, tuple[Path, dict]] = {}
        self._data_start: dict[Path, int] = {}
        for p in files:
            for name, info in read_header(p).items():
                if name != "__metadata__":
                    self._where[name] = (p, info)
        self.used: set[str] = set()

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def describe(self, name: str) -> str:
        p = self._where.get(name, (self.files[0] if self.files else Path("?"), None))[0]
        return f"{p.name}:{name}"

    def _load(self, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """The tensor's bytes (rows r0:r1 of it, if given) read into memory of its own. Not
        through safetensors' mmap: every page read that way stays counted in the process's RSS
        while the file is mapped, beside the copies made from it (at 1B parameters, 2.4 GB of
        bf16 pages through a compile)."""
        path, info = self._where[name]
        a, b = info["data_offsets"]
        dtype, shape = DTYPES[_ST_DTYPES[info["dtype"]]], tuple(info["shape"])
        if r0 is not None and shape:  # rows are contiguous: their bytes are one range
            row = (b - a) // max(1, shape[0])
            a, b, shape = a + r0 * row, a + r1 * row, (r1 - r0, *shape[1:])
        if b == a:
            return torch.empty(shape, dtype=dtype)
        if path not in self._data_start:
            with open(path, "rb") as f:
                self._data_start[path] = 8 + struct.unpack("<Q", f.read(8))[0]
        buf = bytearray(b - a)
        try:
            with open(path, "rb") as f:
                f.seek(self._data_start[path] + a)
                got = f.readinto(buf)
        except OSError as e:
            raise SlmcError(f"cannot read safetensors file: {e.strerror}", str(path)) from None
        if got != len(buf):
            raise SlmcError(f"file is truncated: tensor {name!r} needs {len(buf)} bytes, read {got}", str(path))
        return torch.frombuffer(buf, dtype=dtype).view(shape)

    def weight(self, name: str) -> Weight:
        path, info = self._where[name]
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise SlmcError(f"tensor dtype {info['dtype']} is not supported", self.describe(name))
        self.used.add(name)
        return Weight(shape=tuple(info["shape"]), dtype=dt, loader=lambda: self._load(name),
                      part=lambda r0, r1: self._load(name, r0, r1))
