"""Single-function .mlpackages as one multifunction package, equal weights stored once.

coremltools' `save_multifunction` loads every source program into pymil with each weight as
a numpy array (the whole model once per function) to find equal constants, then serializes a
new program: on the default model that step was the compile's peak (1602 MiB against 1216
for the conversions, bench/results/memory.md). Sharing needs no change to the programs, only
to their weight references: an op names a blob of its package's weight.bin by offset, and two
functions share a weight when they name the same blob. So here the blobs are streamed into
one file, a blob equal to one already there (same dtype, size and bytes) is dropped, and each
function's references are re-pointed. The functions and the model description come out as
coremltools' merge writes them (tests/test_coreml_merge.py compares the two), with no weight
held in memory.

Weight file format (coremltools, mlmodel/src/MILBlob/Blob/StorageFormat.hpp): a 64-byte
header (u32 blob count, u32 version 2, reserved), then per blob a 64-byte metadata record
(u32 sentinel 0xDEADBEEF, u32 dtype, u64 size, u64 data offset, reserved) and the data, each
64-byte aligned. A program names a blob by its metadata record's offset.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

from ...errors import SlmcError
from ..coreml_import import coremltools

WEIGHTS = "@model_path/weights/weight.bin"
IOS18_SPEC = 9  # multifunction packages need specification version 9 (iOS 18)
_ALIGN = 64
_CHUNK = 16 << 20
_SENTINEL = 0xDEADBEEF
_HEADER = struct.Struct("<II")  # count, version (56 reserved bytes follow)
_META = struct.Struct("<IIQQ")  # sentinel, dtype, size, data offset (40 reserved bytes follow)


def package_files(package: Path) -> tuple[Path, Path]:
    """The spec and weight file of a package, found through its Manifest.json."""
    try:
        items = json.loads((package / "Manifest.json").read_text())["itemInfoEntries"].values()
        paths = {item["name"]: package / "Data" / item["path"] for item in items}
        return paths["model.mlmodel"], paths["weights"] / "weight.bin"
    except (OSError, KeyError, ValueError) as e:
        raise SlmcError(f"not an ML Program package with weights ({e})", str(package)) from None


def blob_values(msg):
    """Every BlobFileValue in a proto message, depth first (the messages themselves, to edit)."""
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.name == "blobFileValue":
            yield value
        elif hasattr(value, "ListFields"):
            yield from blob_values(value)
        elif hasattr(value, "keys"):  # a map: its values, when they are messages
            for key in sorted(value):
                if hasattr(value[key], "ListFields"):
                    yield from blob_values(value[key])
        else:
            for item in value:
                yield from blob_values(item)


class _WeightFile:
    """A weight file written blob by blob; a blob equal to an earlier one is not kept."""

    def __init__(self, path: Path):
        self.f = open(path, "w+b")
        self.f.write(bytes(_ALIGN))
        self.count = 0
        self.seen: dict[bytes, int] = {}

    def add(self, src, offset: int, where: str) -> int:
        """Copy the blob whose metadata is at `offset` of `src`; its offset here."""
        src.seek(offset)
        meta = src.read(_ALIGN)
        if len(meta) < _ALIGN or _META.unpack_from(meta)[0] != _SENTINEL:
            raise SlmcError(f"no weight blob at offset {offset}", where)
        _, _, size, data_at = _META.unpack_from(meta)
        end = self.f.seek(0, 2)
        at = end + (-end % _ALIGN)
        self.f.seek(at)
        self.f.write(meta[:16] + struct.pack("<Q", at + _ALIGN) + meta[24:])
        key = hashlib.sha256(meta[:16] + meta[24:])  # dtype, size, reserved: all but its place
        src.seek(data_at)
        left = size
        while left:
            chunk = src.read(min(_CHUNK, left))
            if not chunk:
                raise SlmcError(f"weight blob at offset {offset} is cut short", where)
            key.update(chunk)
            self.f.write(chunk)
            left -= len(chunk)
        digest = key.digest()
        if digest in self.seen:  # written already: take this copy back
            self.f.truncate(end)
            return self.seen[digest]
        self.seen[digest] = at
        self.count += 1
        return at

    def close(self) -> None:
        end = self.f.seek(0, 2)
        self.f.write(bytes(-end % _ALIGN))
        self.f.seek(0)
        self.f.write(_HEADER.pack(self.count, 2))
        self.f.close()


def _function_description(spec, name: str):
    from coremltools.proto import Model_pb2

    d = spec.description
    if d.functions:
        raise SlmcError("a source package already has several functions", name)
    return Model_pb2.FunctionDescription(
        name=name, input=d.input, output=d.output, state=d.state,
        predictedFeatureName=d.predictedFeatureName,
        predictedProbabilitiesName=d.predictedProbabilitiesName)


def merge_functions(sources: dict[str, Path], default: str, out: Path) -> None:
    """Write `out`, a package whose functions are each source's `main`, named by the keys of
    `sources`, with `default` as its default function. The sources are consumed."""
    coremltools()
    from coremltools.proto import Model_pb2

    names = list(sources)
    if default not in names:
        raise SlmcError(f"default function {default!r} is not one of {names}", str(out))
    merged = Model_pb2.Model()
    first_spec, first_weights = package_files(sources[names[0]])
    weights = _WeightFile(first_weights.with_name("merged.bin"))
    try:
        for name in names:
            spec_path, weight_path = package_files(sources[name])
            spec = Model_pb2.Model()
            spec.ParseFromString(spec_path.read_bytes())
            if spec.WhichOneof("Type") != "mlProgram" or list(spec.mlProgram.functions) != ["main"]:
                raise SlmcError("expected an ML Program with one function, main", str(sources[name]))
            if not merged.HasField("mlProgram"):
                merged.mlProgram.version = spec.mlProgram.version
            merged.specificationVersion = max(merged.specificationVersion, spec.specificationVersion,
                                              IOS18_SPEC)
            fn = spec.mlProgram.functions["main"]
            refs = list(blob_values(fn))
            other = next((r.fileName for r in refs if r.fileName != WEIGHTS), None)
            if other is not None:
                raise SlmcError(f"weight in {other!r}, expected {WEIGHTS}", str(sources[name]))
            moved: dict[int, int] = {}
            with open(weight_path, "rb") as src:
                for offset in sorted({r.offset for r in refs}):  # file order: one sequential read
                    moved[offset] = weights.add(src, offset, str(weight_path))
            for r in refs:
                r.offset = moved[r.offset]
            merged.mlProgram.functions[name].CopyFrom(fn)
            merged.description.functions.append(_function_description(spec, name))
    finally:
        weights.close()
    merged.description.defaultFunctionName = default
    # the first package becomes the merged one: same layout, its spec and weights replaced
    first_weights.with_name("merged.bin").replace(first_weights)
    first_spec.write_bytes(merged.SerializeToString(deterministic=True))
    shutil.move(str(sources[names[0]]), str(out))
    for name in names[1:]:
        shutil.rmtree(sources[name])
