"""The multifunction merge (targets/coreml/merge.py) against coremltools' save_multifunction,
on the prefill and decode packages of a real tiny conversion: the same description, the same
functions with every weight reference naming a blob of the same bytes, the same sharing."""

import hashlib
import shutil
import struct
from pathlib import Path
from unittest import mock

import pytest

from slmc.errors import SlmcError
from slmc.targets.coreml import merge

pytest.importorskip("coremltools")
FNS = ("prefill", "decode")


@pytest.fixture(scope="module")
def sources(tiny_llama_dir, tmp_path_factory):
    """The two single-function packages a default Core ML compile merges (kept aside)."""
    from click.testing import CliRunner

    from slmc.cli import main

    keep, real = tmp_path_factory.mktemp("coreml-sources"), merge.merge_functions

    def keeping(srcs, default, out):
        for fn, path in srcs.items():
            shutil.copytree(path, keep / f"{fn}.mlpackage")
        return real(srcs, default, out)

    with mock.patch.object(merge, "merge_functions", keeping):
        res = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-o", str(keep / "out"),
                                        "--target", "coreml", "--max-seq-len", "32"])
    assert res.exit_code == 0, res.output
    return keep


def _copies(sources, tmp_path):
    for fn in FNS:
        shutil.copytree(sources / f"{fn}.mlpackage", tmp_path / f"{fn}.mlpackage")
    return {fn: tmp_path / f"{fn}.mlpackage" for fn in FNS}


def _ours(sources, tmp_path):
    out = tmp_path / "ours" / "model.mlpackage"
    out.parent.mkdir()
    merge.merge_functions(_copies(sources, tmp_path / "o"), "prefill", out)
    return out


def _coremltools(sources, tmp_path):
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    for fn in FNS:
        desc.add_function(str(sources / f"{fn}.mlpackage"), src_function_name="main", target_function_name=fn)
    desc.default_function_name = "prefill"
    out = tmp_path / "ref" / "model.mlpackage"
    ct.utils.save_multifunction(desc, str(out))
    return out


def _load(package):
    from coremltools.proto import Model_pb2

    spec_path, weights = merge.package_files(package)
    return Model_pb2.Model.FromString(spec_path.read_bytes()), weights


def _blob(weights: Path, offset: int) -> tuple:
    with open(weights, "rb") as f:
        f.seek(offset)
        sentinel, dtype, size, at = struct.unpack("<IIQQ", f.read(24))
        assert sentinel == 0xDEADBEEF
        f.seek(at)
        return dtype, size, hashlib.sha256(f.read(size)).hexdigest()


def _by_content(package):
    """The program with every blob reference replaced by its blob's content; read_state and
    write_state ops unnamed (coremltools' load-and-save renumbers them)."""
    from coremltools.proto import Model_pb2

    spec, weights = _load(package)
    spec = Model_pb2.Model.FromString(spec.SerializeToString())
    contents = {}
    for ref in merge.blob_values(spec):
        blob = _blob(weights, ref.offset)
        ref.offset = contents.setdefault(blob, len(contents))
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                if op.type in ("read_state", "write_state"):
                    del op.attributes["name"]
    return spec, contents


def test_same_package_as_coremltools(sources, tmp_path):
    ours, ref = _ours(sources, tmp_path), _coremltools(sources, tmp_path)
    (a, a_blobs), (b, b_blobs) = _by_content(ours), _by_content(ref)
    assert set(a.mlProgram.functions) == set(b.mlProgram.functions) == set(FNS)  # a proto map
    assert [f.name for f in a.description.functions] == list(FNS)
    assert a.description == b.description and a.specificationVersion == b.specificationVersion
    assert a.mlProgram == b.mlProgram  # same ops, each weight a blob of the same bytes
    assert set(a_blobs) == set(b_blobs)
    # shared like coremltools': one blob per distinct weight, both functions naming it
    spec, weights = _load(ours)
    offsets = {fn: {r.offset for r in merge.blob_values(spec.mlProgram.functions[fn])} for fn in FNS}
    assert offsets["prefill"] & offsets["decode"]
    assert len(offsets["prefill"] | offsets["decode"]) == len(a_blobs)
    assert weights.stat().st_size <= _load(ref)[1].stat().st_size


def test_weight_file_is_well_formed(sources, tmp_path):
    """Header count, 64-byte alignment, each record's data right after it; and coremltools'
    own loader reads every const of each function as the source package held it."""
    import numpy as np
    from coremltools.converters.mil.frontend.milproto.load import load

    ours = _ours(sources, tmp_path)
    _, weights = _load(ours)
    data = weights.read_bytes()
    count, version = struct.unpack_from("<II", data)
    at, seen = 64, 0
    while at < len(data):
        sentinel, _, size, data_at = struct.unpack_from("<IIQQ", data, at)
        assert sentinel == 0xDEADBEEF and data_at == at + 64 and at % 64 == 0
        at, seen = data_at + size + (-(data_at + size) % 64), seen + 1
    assert (count, version, at) == (seen, 2, len(data))

    def consts(package, fn):
        spec, w = _load(package)
        prog = load(model_spec=spec, specification_version=spec.specificationVersion,
                    file_weights_dir=str(w.parent))
        return {op.name: op.outputs[0].val for op in prog.functions[fn].operations if op.op_type == "const"}

    for fn in FNS:
        mine, src = consts(ours, fn), consts(sources / f"{fn}.mlpackage", "main")
        assert mine.keys() == src.keys()
        for name, v in src.items():
            assert np.array_equal(np.asarray(mine[name]), np.asarray(v)), name


def test_comparison_sees_a_wrong_reference(sources, tmp_path):
    """Control: the comparison above fails when one reference names another (equal-sized) blob."""
    ours = _ours(sources, tmp_path)
    spec_path, weights = merge.package_files(ours)
    spec, _ = _load(ours)
    refs = list(merge.blob_values(spec.mlProgram.functions["decode"]))
    blobs = [_blob(weights, r.offset) for r in refs]
    i, j = next((i, j) for i in range(len(refs)) for j in range(len(refs))
                if blobs[i][:2] == blobs[j][:2] and blobs[i] != blobs[j])
    refs[i].offset, refs[j].offset = refs[j].offset, refs[i].offset
    spec_path.write_bytes(spec.SerializeToString())
    assert _by_content(ours)[0].mlProgram != _by_content(_coremltools(sources, tmp_path))[0].mlProgram


def test_bad_weight_file_is_an_error_naming_it(sources, tmp_path):
    srcs = _copies(sources, tmp_path)
    spec, weights = _load(srcs["decode"])
    first = min(r.offset for r in merge.blob_values(spec))
    with open(weights, "r+b") as f:
        f.seek(first)
        f.write(b"\0\0\0\0")
    out = tmp_path / "model.mlpackage"
    with pytest.raises(SlmcError, match=f"no weight blob at offset {first}") as e:
        merge.merge_functions(srcs, "prefill", out)
    assert str(weights) in str(e.value) and not out.exists()
