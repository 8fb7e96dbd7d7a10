"""LiteRT's splice writes a quantized table's packed codes a part at a time, and lets the part's
source pages go after each (issue 17: a 128k-row table's 250 MiB of mapped codes were resident
by the end of that buffer, the LiteRT Llama-3.2-1B rtn compile's peak)."""

import io
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_litert")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")

from slmc.compiler.ir import QuantWeight  # noqa: E402
from slmc.compiler.spill import Spill  # noqa: E402
from slmc.targets.tflite import codes  # noqa: E402


def _resident_kib(t: torch.Tensor) -> int:
    lo, kib, inside = t.data_ptr(), 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            inside = a <= lo < b
        elif inside and line.startswith("Rss:"):
            kib += int(line.split()[1])
    return kib


def test_each_part_of_a_mapped_table_is_let_go_as_it_is_written(monkeypatch):
    monkeypatch.setattr(codes, "_PART", 1 << 21)  # 2 MiB parts of an 8 MiB table
    c = torch.randint(-8, 8, (1024, 8192), dtype=torch.int8)
    m = Spill("test").mapped(c)
    w = QuantWeight(codes=m, scales=torch.ones(1024, 256), zeros=None, group_size=32, bits=4, symmetric=True)
    d = codes._stored_codes(w)
    seen = []
    real = d.parts

    def parts():
        for p in real():
            seen.append(_resident_kib(m))  # this part's pages, and any still held from before
            yield p

    d.parts = parts
    from ai_edge_litert import schema_py_generated as S

    mt = S.ModelT()
    mt.buffers = [S.BufferT(), S.BufferT()]
    out = io.BytesIO()
    codes._write_packed(mt, [None, d], out)
    assert len(seen) == 4 and max(seen) <= 2 * 1024 + 8, seen
    packed = np.frombuffer(out.getvalue()[-d.nbytes:], np.uint8)
    assert np.array_equal(packed, codes.pack_int4(c.numpy()))
    m.float().sum()  # control: reading it whole leaves its pages resident
    assert _resident_kib(m) >= 8000
