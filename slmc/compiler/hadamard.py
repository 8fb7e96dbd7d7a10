"""Orthogonal matrices for quant.rotate: Hadamard where one can be built, else random.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I; H / sqrt(n) is orthogonal
and spreads every input coordinate evenly over all outputs, which flattens the outlier
channels that make low-bit weights and activations lossy (QuaRot, SpinQuant). Orders are
built here, nothing is tabulated:
- Sylvester: H_2 = [[1, 1], [1, -1]], and Kronecker products H_a (x) H_b (order a * b);
- Paley I: q prime, q = 3 (mod 4) -> order q + 1 (from the quadratic residues mod q);
- Paley II: q prime, q = 1 (mod 4) -> order 2 (q + 1).
Every constructed matrix is checked (H H^T = n I) before use. Sizes with no construction
here (any n > 2 that is not a multiple of 4, and a few multiples of 4) fall back to a
seeded Haar-random orthogonal matrix.
"""

from __future__ import annotations

from functools import cache

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q (chi(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 mod 4: H = I + S, S = [[0, 1^T], [-1, Q]] skew."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime q = 1 mod 4, from the symmetric conference matrix C."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


@cache
def _build(n: int) -> tuple[torch.Tensor, str] | None:
    """A +-1 Hadamard matrix of order n and how it was built, or None."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64), "1"
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), "2"
    if n % 4:
        return None
    if n & (n - 1) == 0:  # Sylvester: H_n = H_2 (x) H_(n/2)
        return torch.kron(_build(2)[0], _build(n // 2)[0]), f"sylvester({n})"
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley1(n - 1), f"paley1({n - 1})"
    if _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return _paley2(n // 2 - 1), f"paley2({n // 2 - 1})"
    for d in range(2, n // 2 + 1):  # the smallest factor with a construction on both sides
        if n % d == 0:
            a, b = _build(d), _build(n // d)
            if a is not None and b is not None:
                return torch.kron(a[0], b[0]), f"{a[1]}x{b[1]}"
    return None


def hadamard(n: int) -> tuple[torch.Tensor, str] | None:
    """(H, recipe) with H a +-1 Hadamard matrix of order n (float64), or None if none is built."""
    got = _build(n)
    if got is None:
        return None
    h, how = got
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)):  # never trust a construction
        raise AssertionError(f"Hadamard construction {how} of order {n} is not orthogonal")
    return h.clone(), how


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation(n: int, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, str]:
    """An n x n orthogonal matrix (float64) and its description. kind="hadamard": a Hadamard
    matrix / sqrt(n) with seeded random column signs (QuaRot's randomized Hadamard), else
    random when no Hadamard of order n is built here; kind="random": Haar-random."""
    if kind == "hadamard":
        got = hadamard(n)
        if got is not None:
            signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
            return signs[:, None] * got[0] / n ** 0.5, f"hadamard {got[1]}"
    return random_orthogonal(n, gen), "random"
