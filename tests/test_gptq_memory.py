"""quant.gptq's Hessian factorization holds H and one factor, not H beside a damped copy (issue 17:
an 8192-wide down projection's H is 256 MiB), and still retries with more damping when the
inverse's factorization fails."""

import errno
import gc
import weakref

import pytest
import torch

from slmc.errors import SlmcError
from slmc.passes import quant_gptq as q


def _hessian(n=300, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) * torch.rand(cols, generator=g) * 3
    return x.T @ x / n * 2


def test_the_factorization_frees_h_once_it_has_its_first_factor(monkeypatch):
    seen = []
    real = torch.cholesky_inverse

    def spy(L, *a, **k):  # runs after the first factorization, before the inverse exists
        gc.collect()
        seen.append(ref() is not None)
        return real(L, *a, **k)

    monkeypatch.setattr(torch, "cholesky_inverse", spy)
    H = _hessian()
    ref = weakref.ref(H)
    work = [H]
    del H
    U = q._hinv_upper(work, 0.01)
    held = _hessian()  # control: a caller still holding its H keeps it alive
    ref = weakref.ref(held)
    q._hinv_upper([held], 0.01)
    assert seen == [False, True] and U.shape == (128, 128)


def test_a_failed_inverse_factorization_retries_from_h_with_more_damping(monkeypatch):
    """H was freed after its first factor; the retry reads it back (from the stash) and damps
    it 10x more: the same factor as asking for that damping directly."""
    H = _hessian()
    want = q._hinv_upper([H.clone()], 0.1)
    plain = q._hinv_upper([H.clone()], 0.01)
    real, calls = torch.linalg.cholesky_ex, []

    def flaky(A, upper=False, **k):
        L, info = real(A, upper=upper, **k)
        if upper:
            calls.append(1)
            if len(calls) == 1:  # the inverse's first factorization "fails"
                return L, torch.tensor(1)
        return L, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    got = q._hinv_upper([H.clone()], 0.01)
    assert len(calls) == 2 and torch.equal(got, want)
    assert not torch.equal(plain, want)  # control: the retry's damping changes the factor


def test_the_caller_keeps_its_hessian_unless_it_hands_it_over():
    from slmc.compiler.quant import QuantScheme

    H, W = _hessian(), torch.randn(64, 128)
    H[5, :] = H[:, 5] = 0  # a dead input: gptq edits its own copy, not the caller's
    H0 = H.clone()
    s = QuantScheme(bits=4, group_size=32, symmetric=True)
    a = q.gptq(W, H, s, act_order=False, clip=True)
    assert torch.equal(H, H0)
    b = q.gptq(W.clone(), H.clone(), s, act_order=False, clip=True, overwrite=True)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))


def test_no_scratch_space_for_the_stash_is_one_clear_error(monkeypatch):
    import tempfile

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    with pytest.raises(SlmcError, match="scratch space.*No space left"):
        q._hinv_upper([_hessian()], 0.01)
