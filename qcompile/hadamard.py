"""Hadamard matrices of many sizes, and a fast Walsh-Hadamard transform (numpy).

A Hadamard matrix H of order n has entries +-1 and H H^T = n I. Orders built here:

1. n = 2^k (k >= 0): Sylvester, ``H_2n = [[H, H], [H, -H]]`` (symmetric).
2. n = q + 1, q an odd prime with q = 3 (mod 4): Paley I (4, 8, 12, 20, 24, 32, 44, 48, ...).
3. n = 2 (q + 1), q an odd prime with q = 1 (mod 4): Paley II (12, 28, 36, 60, 76, 84, ...).
4. n = p * 2^k with p one of the Paley orders above: ``kron(H_p, H_{2^k})``.

Only prime q are used (not prime powers), which keeps the construction to Legendre
symbols. MiniLM's sizes are 384 = 12 * 32 and 1536 = 12 * 128. :func:`hadamard` raises
:class:`ShapeError` naming the size when none of the constructions reaches it.

Convention: ``hadamard(n)`` is normalized, ``H / sqrt(n)``, so it is orthogonal (H H^T = I);
:func:`hadamard_transform` computes ``x @ kron(I, hadamard(size))`` along the last axis
(blocks of ``size`` contiguous channels) in O(n log n) for the power-of-two factor.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import ShapeError

__all__ = ["hadamard", "hadamard_unnormalized", "is_supported", "factor", "hadamard_transform",
           "largest_supported_divisor", "MAX_PALEY_Q"]

MAX_PALEY_Q = 400  # largest prime q tried by Paley I/II (orders up to 802)


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def _legendre_row(q: int) -> np.ndarray:
    """chi(j) for j in 0..q-1: 0 at j = 0, +1 for quadratic residues, -1 otherwise."""
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    chi[sorted({(i * i) % q for i in range(1, q)})] = 1
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    chi = _legendre_row(q)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]  # Q[i, j] = chi(j - i)


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q prime = 3 mod 4 (Q skew-symmetric)."""
    jac = _jacobsthal(q)
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return s + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1), q prime = 1 mod 4 (Q symmetric)."""
    jac = _jacobsthal(q)
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jac
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    plus = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(c, plus) + np.kron(np.eye(q + 1, dtype=np.int64), zero)


@lru_cache(maxsize=None)
def _paley_orders() -> dict[int, tuple[str, int]]:
    """Paley order -> (construction, q), odd part > 1 only (powers of two use Sylvester)."""
    orders: dict[int, tuple[str, int]] = {}
    for q in range(3, MAX_PALEY_Q + 1):
        if not _is_prime(q):
            continue
        kind, n = ("paley1", q + 1) if q % 4 == 3 else ("paley2", 2 * (q + 1))
        odd = n
        while odd % 2 == 0:
            odd //= 2
        if odd > 1 and n not in orders:
            orders[n] = (kind, q)
    return orders


def factor(n: int) -> tuple[int, int] | None:
    """(p, 2^k) with n = p * 2^k, p = 1 or a Paley order; None if no construction reaches n."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return 1, n
    best = None
    for p in sorted(_paley_orders()):
        if n % p == 0 and (n // p) & (n // p - 1) == 0:
            best = (p, n // p) if best is None else best
    return best


def is_supported(n: int) -> bool:
    return factor(n) is not None


def largest_supported_divisor(n: int) -> int:
    """The largest d dividing n with a Hadamard matrix of order d (1 always qualifies)."""
    return max(d for d in range(1, n + 1) if n % d == 0 and is_supported(d))


@lru_cache(maxsize=32)
def _int_hadamard(n: int) -> np.ndarray:
    f = factor(n)
    if f is None:
        raise ShapeError(
            f"no Hadamard matrix of size {n}: supported sizes are p * 2^k with p = 1 or a Paley "
            f"order (12, 20, 28, 36, 44, ...; Paley I/II for primes q <= {MAX_PALEY_Q})"
        )
    p, two_k = f
    syl = np.ones((1, 1), dtype=np.int64)
    while syl.shape[0] < two_k:
        syl = np.block([[syl, syl], [syl, -syl]])
    if p == 1:
        return syl
    kind, q = _paley_orders()[p]
    base = _paley1(q) if kind == "paley1" else _paley2(q)
    return np.kron(base, syl)


def hadamard_unnormalized(n: int) -> np.ndarray:
    """The +-1 Hadamard matrix of order ``n`` (int64, a fresh array)."""
    return _int_hadamard(n).copy()


def hadamard(n: int, dtype=np.float32) -> np.ndarray:
    """Orthogonal ``H / sqrt(n)`` of order ``n`` (raises ShapeError naming n if unsupported)."""
    return (_int_hadamard(n) / np.sqrt(n)).astype(dtype)


def hadamard_transform(x: np.ndarray, size: int | None = None) -> np.ndarray:
    """``x @ kron(I, hadamard(size))`` along the last axis, in O(n log n) for the 2^k factor.

    ``size`` (default: the last dimension) must divide the last dimension; each contiguous
    block of ``size`` channels is rotated on its own. Float math stays in x's dtype.
    """
    x = np.asarray(x)
    last = x.shape[-1]
    size = last if size is None else int(size)
    if size < 1 or last % size:
        raise ShapeError(f"Hadamard size {size} does not divide the last dimension {last}")
    f = factor(size)
    if f is None:
        hadamard(size)  # raises the ShapeError naming the size
    p, two_k = f
    dtype = x.dtype.type if np.issubdtype(x.dtype, np.floating) else np.float32
    y = x.astype(dtype, copy=True).reshape(-1, p, two_k)
    h = 1
    while h < two_k:  # Sylvester butterflies: pairs (i, i + h) with bit h of i clear
        y = y.reshape(y.shape[0], p, two_k // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = np.stack([a + b, a - b], axis=3).reshape(-1, p, two_k)
        h *= 2
    if p > 1:  # result[a', j] = sum_a y[a, j] * Hp[a, a']
        hp = _int_hadamard(p).astype(dtype)
        y = np.einsum("maj,ab->mbj", y, hp)
    y = y * dtype(1.0 / np.sqrt(size))
    return y.reshape(x.shape).astype(dtype)
