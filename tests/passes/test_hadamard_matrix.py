"""qcompile.hadamard: Paley/Sylvester/Kronecker construction, orthogonality, fast transform."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.errors import ShapeError
from qcompile.hadamard import factor, hadamard, hadamard_transform, hadamard_unnormalized, is_supported


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 44, 60, 384, 1536])
def test_orthogonal_and_plus_minus_one(n):
    h = hadamard_unnormalized(n)
    assert set(np.unique(h)) <= {-1, 1}
    hf = h.astype(np.float64)  # exact: integer entries, BLAS speed
    np.testing.assert_array_equal(hf @ hf.T, n * np.eye(n))
    hn = hadamard(n).astype(np.float64)
    np.testing.assert_allclose(hn @ hn.T, np.eye(n), atol=1e-6)


def test_factors_of_minilm_sizes():
    assert factor(384) == (12, 32)
    assert factor(1536) == (12, 128)
    assert factor(1024) == (1, 1024)


@pytest.mark.parametrize("n", [2, 12, 20, 24, 28, 384, 1536])
def test_fast_transform_equals_matmul(n):
    x = np.random.default_rng(n).standard_normal((3, 5, n)).astype(np.float32)
    np.testing.assert_allclose(hadamard_transform(x), x @ hadamard(n), atol=1e-5)


def test_blocked_transform_is_block_diagonal():
    x = np.random.default_rng(0).standard_normal((4, 384)).astype(np.float32)
    want = x @ np.kron(np.eye(12, dtype=np.float32), hadamard(32))
    np.testing.assert_allclose(hadamard_transform(x, 32), want, atol=1e-5)


@pytest.mark.parametrize("n", [3, 6, 52])
def test_unsupported_size_names_it(n):
    assert not is_supported(n)
    with pytest.raises(ShapeError, match=f"size {n}"):
        hadamard(n)
    with pytest.raises(ShapeError, match=f"size {n}"):
        hadamard_transform(np.zeros((2, n), np.float32))
