"""8-bit codes as two 4-bit planes in the ONNX graph (slmc/targets/onnx/split8.py).

- The planes hold the 8-bit image exactly: joined(planes(u, z)) gives u and z back.
- onnxruntime's split ops dequantize to the reference's floats within a bound fixed from the
  arithmetic, not from a run: the reference rounds s*(u - z) once (<= 2^-24 * 255 s); the
  split rounds (hi - zh)*s, (lo - zl)*s and their sum (<= 2^-24 * (240 + 15 + 255) s; x16 is
  exact). So |split - reference| < 2^-14 * s for each weight, s its block's scale. A code
  off by one moves a weight by s: the control.
- readback rebuilds the 8-bit image from the planes, and a changed nibble is reported.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from slmc import api
from slmc.cli import main
from slmc.compiler.quant import QuantScheme, rtn
from slmc.targets import get_target
from slmc.targets.onnx.codes import images
from slmc.targets.onnx.split8 import SIXTEEN, gather_nodes, joined, matmul_nodes, planes

CASES = [(True, 32), (False, 16), (True, 0), (False, 48)]  # symmetric, group (0: per channel)
N, K = 40, 192


def _weight(symmetric, group):
    g = torch.Generator().manual_seed(group + symmetric)
    return rtn(torch.randn(N, K, generator=g), QuantScheme(8, group or K, symmetric, "float32"), "rtn")


def _initializers(im):
    p = planes(im.codes, im.zeros)
    mm = {"hi": p.hi, "lo": p.lo, "s": im.scales, "zh": None if p.zh is None else p.zh.reshape(-1),
          "zl": p.zl.reshape(-1)}
    rows = {"hi": p.hi.reshape(N, -1), "lo": p.lo.reshape(N, -1), "s": im.scales, "zh": p.zh, "zl": p.zl}
    return mm, rows


def _run(nodes, arrays, x_name, x):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(a, k) for k, a in arrays.items() if a is not None]
    inits.append(numpy_helper.from_array(np.array(16.0, np.float32), SIXTEEN))
    elem = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.INT64
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x_name, elem, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {x_name: x})[0]


def _names(arrays):
    return {k: (k if a is not None else None) for k, a in arrays.items()}


@pytest.mark.parametrize("symmetric,group", CASES)
def test_planes_hold_the_8bit_image_exactly(symmetric, group):
    im = images(_weight(symmetric, group))
    p = planes(im.codes, im.zeros)
    codes, zeros = joined(p.hi.tobytes(), p.lo.tobytes(), None if p.zh is None else p.zh.tobytes(), p.zl.tobytes(),
                          N, im.scales.shape[1])
    assert codes == im.codes.tobytes()
    assert zeros == (b"" if im.zeros is None else im.zeros.tobytes())
    if symmetric:  # the control: a symmetric image whose low plane has a zero point is not symmetric
        zl = p.zl.copy()
        zl[0, 0] = 1
        assert joined(p.hi.tobytes(), p.lo.tobytes(), None, zl.tobytes(), N, im.scales.shape[1])[1] != b""


@pytest.mark.parametrize("symmetric,group", CASES)
def test_split_ops_dequantize_within_the_fixed_bound(symmetric, group):
    """MatMulNBits on A = identity returns dequant(B)^T; the gather returns rows."""
    w = _weight(symmetric, group)
    im = images(w)
    ref = w.float().numpy()
    s = np.repeat(im.scales, im.block, axis=1)  # each weight's scale
    bound = 2.0 ** -14 * s
    mm, rows = _initializers(im)
    nodes = matmul_nodes("m", "a", "y", _names(mm), K, N, im.block)
    got = _run(nodes, mm, "a", np.eye(K, dtype=np.float32)).T
    assert np.all(np.abs(got - ref) <= bound), np.max(np.abs(got - ref) / s)
    idx = np.array([[0, 7, 39, 7]], dtype=np.int64)
    nodes = gather_nodes("g", "i", "y", _names(rows), im.block)
    got = _run(nodes, rows, "i", idx)
    assert np.all(np.abs(got - ref[idx]) <= bound[idx])
    # the control: one code of the low plane off by one moves its weight by s, past the bound
    bad = dict(mm, lo=mm["lo"].copy())
    bad["lo"].reshape(-1)[0] ^= 1
    got = _run(matmul_nodes("m", "a", "y", _names(bad), K, N, im.block), bad, "a", np.eye(K, dtype=np.float32)).T
    assert not np.all(np.abs(got - ref) <= bound)


@pytest.fixture(scope="module")
def q_artifact(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("split8") / "q"
    res = CliRunner().invoke(main, ["compile", str(tiny_llama_dir), "-t", "onnx", "-o", str(out),
                                    "--max-seq-len", "32", "--recipe", "int4-g32-onnx"])
    assert res.exit_code == 0, res.output
    return out


def _edited(src, dst, name, edit):
    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / "model.onnx"))
    init = next(t for t in proto.graph.initializer if t.name == name)
    a = numpy_helper.to_array(init).copy()
    edit(a)
    init.CopyFrom(numpy_helper.from_array(a, name))
    onnx.save(proto, str(dst / "model.onnx"))
    return dst / "model.onnx"


@pytest.mark.parametrize("name,edit", [
    ("embed.qcodes_lo", lambda a: a.reshape(-1).__setitem__(3, a.reshape(-1)[3] ^ 0x10)),
    ("embed.qcodes_hi", lambda a: a.reshape(-1).__setitem__(0, a.reshape(-1)[0] ^ 0x01)),
    ("embed.qzeros_lo", lambda a: a.reshape(-1).__setitem__(0, 1)),
])
def test_readback_rebuilds_the_table_and_sees_a_changed_plane(q_artifact, tmp_path, name, edit):
    """The tied int8 table is read back through both split ops (head and gather); one changed
    nibble or zero point in either plane is reported for both."""
    man = json.loads((q_artifact / "manifest.json").read_text())
    model = api.reference_model(q_artifact, man)
    target = get_target("onnx")
    assert target.readback(model, q_artifact / "model.onnx").exact
    rb = target.readback(model, _edited(q_artifact, tmp_path / "b", name, edit))
    assert sorted(rb.missing) == [
        "embed: codes/scales/zero points not stored unchanged in a GatherBlockQuantized",
        "lm_head(tied): codes/scales/zero points not stored unchanged in a MatMulNBits"]
