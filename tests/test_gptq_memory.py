"""quant.gptq's Hessian work in one buffer (issue 17: an 8192-wide down projection's H is
256 MiB): H is permuted, factored and inverted where it lies, the factor then waits in scratch
space through the loop, and a failed factorization still retries with more damping."""

import errno

import pytest
import torch

from slmc.compiler import spill
from slmc.compiler.quant import QuantScheme
from slmc.compiler.spill import Spill
from slmc.errors import SlmcError
from slmc.passes import quant_gptq as q


def _hessian(n=300, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) * torch.rand(cols, generator=g) * 3
    return x.T @ x / n * 2


def _hwm_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def _reset_hwm():
    spill.trim_heap()  # freed heap the allocator kept would hide an allocation (a long-lived worker)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS here ({e.strerror})")


def _plain(H, damp):  # the factorization as torch makes it: new tensors at each step
    Hd = H.clone()
    Hd.diagonal().add_(damp * float(H.diagonal().mean()))
    return torch.linalg.cholesky_ex(torch.cholesky_inverse(torch.linalg.cholesky_ex(Hd)[0]), upper=True)[0]


def test_column_major_is_the_permuted_hessian_exactly():
    H = _hessian(2000, 1100)  # tiles of 512 with a ragged edge
    H += torch.randn(H.shape) * 1e-7  # not symmetric to the bit, as calib.gram's row blocks may leave it
    perm = torch.randperm(1100)
    A = q._column_major_(H.clone(), perm)
    assert A.mT.is_contiguous() and torch.equal(A, H[perm][:, perm])
    B = q._column_major_(H.clone())
    assert torch.equal(B, H) and not torch.equal(B, A)  # control: perm matters


def test_the_factorization_runs_in_the_hessians_own_buffer():
    H = _hessian(4096, 2048)  # 16 MiB
    A = q._column_major_(H.clone())
    want = _plain(H, 0.01)
    _reset_hwm()
    base = _hwm_mib()
    U = q._hinv_upper(A, 0.01, Spill("test"))
    grew = _hwm_mib() - base
    assert U.data_ptr() == A.data_ptr() and torch.equal(U, want)
    assert grew < 8, f"the factorization grew RSS by {grew:.0f} MiB for a 16 MiB H"
    _reset_hwm()  # control: torch's own steps make a matrix each (this measure sees them)
    base = _hwm_mib()
    _plain(H, 0.01)
    assert _hwm_mib() - base >= 32


def test_a_failed_inverse_factorization_retries_from_h_with_more_damping(monkeypatch):
    """The failed try overwrote A; the retry reads it back from scratch space and damps it 10x
    more: the same factor as asking for that damping directly."""
    H = _hessian()
    want = q._hinv_upper(q._column_major_(H.clone()), 0.1, Spill("test"))
    plain = q._hinv_upper(q._column_major_(H.clone()), 0.01, Spill("test"))
    real, calls = torch.linalg.cholesky_ex, []

    def flaky(A, upper=False, **k):
        L, info = real(A, upper=upper, **k)
        if upper:
            calls.append(1)
            if len(calls) == 1:  # the inverse's first factorization "fails"
                return L, torch.tensor(1)
        return L, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    got = q._hinv_upper(q._column_major_(H.clone()), 0.01, Spill("test"))
    assert len(calls) == 2 and torch.equal(got, want)
    assert not torch.equal(plain, want)  # control: the retry's damping changes the factor
    assert torch.equal(plain, _plain(H, 0.01))


def test_a_singular_hessian_is_damped_until_it_factors():
    H = _hessian(20, 128)  # rank 20: damp=0 fails, then 1e-6 of the mean diagonal and up
    U = q._hinv_upper(q._column_major_(H.clone()), 0.0, Spill("test"))
    assert torch.isfinite(U).all() and torch.equal(U, _plain(H, 1e-6))


def test_the_loop_reads_the_factor_from_scratch_space_a_block_at_a_time(monkeypatch):
    seen = []
    real = spill.let_go
    monkeypatch.setattr(spill, "let_go", lambda r: (seen.append(sum(n for _, n in r)), real(r)))
    H, W = _hessian(2048, 1024), torch.randn(64, 1024)  # a 4 MiB factor
    s = QuantScheme(bits=4, group_size=32, symmetric=True)
    q.gptq(W, H, s, block_size=128, act_order=True)
    assert len(seen) == 1024 // 128 and all(n >= 4 * 2**20 - 4096 for n in seen)
    seen.clear()  # control: a factor under spill.MIN_BYTES (64 x 64 fp32, 16 KiB) is never file-backed
    assert 64 * 64 * 4 < spill.MIN_BYTES
    q.gptq(W[:, :64], H[:64, :64], s, block_size=32)
    assert seen == [0, 0]


def test_the_caller_keeps_its_hessian_unless_it_hands_it_over():
    H, W = _hessian(), torch.randn(64, 128)
    H[5, :] = H[:, 5] = 0  # a dead input: gptq edits its own copy, not the caller's
    H0 = H.clone()
    s = QuantScheme(bits=4, group_size=32, symmetric=True)
    for ao in (False, True):
        a = q.gptq(W, H, s, act_order=ao, clip=True)
        assert torch.equal(H, H0)
        b = q.gptq(W.clone(), H.clone(), s, act_order=ao, clip=True, overwrite=True)
        assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))


def test_no_scratch_space_for_the_stash_is_one_clear_error(monkeypatch):
    import tempfile

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    with pytest.raises(SlmcError, match="scratch space.*No space left"):
        q._hinv_upper(q._column_major_(_hessian()), 0.01, Spill("--pass quant.gptq"))
