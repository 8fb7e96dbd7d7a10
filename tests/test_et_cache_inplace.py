"""ExecuTorch programs write KV rows into the cache buffers in place (program.backend_config's
run_reinplace_pass): index_put_ on the buffer, no index_put.out copying the whole cache to a new
tensor and no copy_ writing it back. Controls: the same module lowered as ExecuTorch does by
default (the copies are in the plan, so the counts can fail; the values are still torch's), and
with ExecuTorch's reinplace pass but without slmc's InPlaceCacheWrites (inplace_writes.py), whose
two hazards then give wrong values. Values are compared with torch step after step, the state
carried by the runtime between calls."""

import collections
from pathlib import Path

import pytest
import torch

from slmc.targets.executorch.program import backend_config

L, KVH, HD = 6, 2, 4


def plan_ops(pte: Path) -> collections.Counter:
    """Kernel calls of the forward plan by operator name (any overload), delegate calls as 'delegate'."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = deserialize_pte_binary(Path(pte).read_bytes()).program.execution_plan[0]
    ops = collections.Counter()
    for chain in plan.chains:
        for ins in chain.instructions:
            a = ins.instr_args
            if type(a).__name__ == "KernelCall":
                ops[plan.operators[a.op_index].name] += 1  # index_put.out counts as index_put
            elif type(a).__name__ == "DelegateCall":
                ops["delegate"] += 1
    return ops


class Cache(torch.nn.Module):
    """One K cache by rows [1, kvh, L, hd] and one V cache by column [1, kvh, hd, L], as the
    decoders keep them, written with index_copy_ and read whole after the write."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.zeros(1, KVH, L, HD))
        self.register_buffer("v", torch.zeros(1, KVH, HD, L))

    def forward(self, rows, slots):
        self.k.index_copy_(2, slots, rows)
        self.v.index_copy_(3, slots, rows.transpose(2, 3).contiguous())
        # read through views, as the portable decoder does: ExecuTorch makes them aliases
        return self.k.view(KVH, L, HD) * 1.0, self.v.view(KVH, HD, L) * 1.0


def lower(tmp_path: Path, name: str, reinplace: bool, passes: bool = True) -> Path:
    from executorch.exir import to_edge

    T = torch.export.Dim("T", min=1, max=L)
    args = (torch.randn(1, KVH, L, HD), torch.arange(L))
    ep = torch.export.export(Cache(), args, dynamic_shapes=({2: T}, {0: T}))
    config = backend_config()
    config.run_reinplace_pass = reinplace
    if not passes:
        config.passes = []
    pte = tmp_path / f"{name}.pte"
    pte.write_bytes(to_edge(ep).to_executorch(config).buffer)
    return pte


def run_steps(pte: Path) -> bool:
    """A full write, then single rows at scattered slots: does every step equal torch's?"""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(pte)).load_method("forward")
    eager = Cache()
    steps = [(torch.randn(1, KVH, L, HD), torch.arange(L))]
    steps += [(torch.randn(1, KVH, 1, HD), torch.tensor([s])) for s in (3, 0, 5, 3)]
    for rows, slots in steps:
        k, v = method.execute([rows, slots])
        want_k, want_v = eager(rows, slots)
        if not (torch.equal(k, want_k) and torch.equal(v, want_v)):
            return False
    return True


@pytest.mark.parametrize("reinplace, in_place, copies", [(True, 2, 0), (False, 0, 2)],
                         ids=["slmc", "control-executorch-default"])
def test_cache_rows_are_written_in_place(tmp_path, reinplace, in_place, copies):
    """slmc's config writes each cache in place; ExecuTorch's default (the control) copies each
    cache twice: index_put.out, then copy_ back into the buffer. Both compute torch's values."""
    pte = lower(tmp_path, "cache", reinplace=reinplace)
    ops = plan_ops(pte)
    assert ops["aten::index_put_"] == in_place
    assert ops["aten::index_put"] == copies and ops["aten::copy_"] == copies
    assert run_steps(pte)


def test_control_reinplaced_without_the_pass_the_views_read_stale_memory(tmp_path):
    """ExecuTorch's reinplace pass alone: the cache views are bound to the write's own spec,
    which memory planning replaces by the buffer's, so they read memory the write never reached."""
    pte = lower(tmp_path, "bare", reinplace=True, passes=False)
    assert plan_ops(pte)["aten::index_put_"] == 2
    assert not run_steps(pte)


def test_every_cache_of_the_8da4w_artifact_is_written_in_place(tiny_et_8da4w, tmp_path):
    folder, manifest = tiny_et_8da4w(tmp_path / "a")
    ops = plan_ops(folder / "model.pte")
    assert ops["aten::index_put_"] == 2 * manifest["model"]["layers"]
    assert ops["aten::index_put"] == 0 and ops["aten::copy_"] == 0


class WriteIntoView(torch.nn.Module):
    """index_put on a view of an intermediate that is read again afterwards. The reinplace check
    sees the view as a copy; ExecuTorch then makes it an alias of `b`, so writing in place would
    change `b` too."""

    def forward(self, x, i, v):
        b = x * 2.0
        t = b.view(-1).index_put((i,), v)
        return t * 1.0, b * 1.0


def lower_view_write(tmp_path: Path, passes: bool) -> Path:
    from executorch.exir import to_edge

    args = (torch.randn(3, 4), torch.tensor([1, 6]), torch.randn(2))
    config = backend_config()
    if not passes:
        config.passes = []
    pte = tmp_path / f"view{int(passes)}.pte"
    pte.write_bytes(to_edge(torch.export.export(WriteIntoView(), args)).to_executorch(config).buffer)
    return pte


def test_a_write_into_an_intermediate_stays_out_of_place(tmp_path):
    from executorch.runtime import Runtime

    x, i, v = torch.randn(3, 4), torch.tensor([1, 6]), torch.randn(2)
    pte = lower_view_write(tmp_path, passes=True)
    ops = plan_ops(pte)
    assert ops["aten::index_put"] == 1 and ops["aten::index_put_"] == 0
    t, b = Runtime.get().load_program(str(pte)).load_method("forward").execute([x, i, v])
    want_t, want_b = WriteIntoView()(x, i, v)
    assert torch.equal(t, want_t) and torch.equal(b, want_b)


def test_control_reinplaced_without_the_pass_the_intermediate_changes(tmp_path):
    from executorch.runtime import Runtime

    x, i, v = torch.randn(3, 4), torch.tensor([1, 6]), torch.randn(2)
    pte = lower_view_write(tmp_path, passes=False)
    assert plan_ops(pte)["aten::index_put_"] == 1
    _, b = Runtime.get().load_program(str(pte)).load_method("forward").execute([x, i, v])
    assert not torch.equal(b, WriteIntoView()(x, i, v)[1])
