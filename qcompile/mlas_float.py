"""Float LayerNorm and Softmax with onnxruntime's x86 CPU rounding, bit for bit.

Both ops are defined up to rounding by ONNX; onnxruntime's CPU kernels pin one rounding each.
A pre-quantized model that re-quantizes activations at run time (``DynamicQuantizeLinear``
after a LayerNorm or a Softmax, as ``quantize_dynamic`` emits) turns a 1-ulp difference in a
row maximum into a different scale for the whole tensor, and so into codes that differ
everywhere downstream. Following onnxruntime's arithmetic exactly is what makes such models
match it (issue 5). These are the kernels of onnxruntime 1.32 on x86-64 with AVX2/AVX-512,
established against it element by element (tests/frontends/test_mlas_float.py).

LayerNorm over rows of ``n`` elements (MLAS ``LayerNormF32`` AVX2 kernel, ``n >= 8``):

* ``mean = float32(sum_float64(x) / n)``;
* ``d = x - mean`` (float32); ``ss``: eight float32 lanes, lane ``l`` accumulating
  ``fma(d[8k+l], d[8k+l], ss_l)`` for ``k = 0, 1, ...``; lanes reduced as halves
  ``(l, l+4)``, then ``(l, l+2)``, then ``(0, 1)``; the ``n mod 8`` tail elements are then
  added one after the other: a block of four as ``ss + d * d`` (both operations rounded),
  the last ``n mod 4`` with ``fma``;
* ``inv = 1 / sqrt(ss / n + eps)`` (float32, each operation rounded);
* ``y = fma(d * inv, gamma, beta)``.

Rows shorter than 8 take onnxruntime's scalar kernel: Welford's running mean and ``M2`` in
float32, ``y = (x - mean) / sqrt(M2 / n + eps) * gamma + beta``.

Softmax along the last axis (MLAS ``MlasComputeSoftmax`` with the AVX-512F kernels):

* ``m = max(x)``; ``v = max(x + (-m), -103.972084)``;
* ``k = fma(v, log2(e), 1.5 * 2**23) - 1.5 * 2**23`` (round to nearest integer);
  ``r = fma(k, -ln2_hi, v)``; ``r = fma(k, -ln2_lo, r)``;
* ``p`` = a degree-6 polynomial in ``r`` by Horner's rule in ``fma``; ``e = p * 2**k`` with
  one rounding (``vscalefps``);
* the row sum: sixteen float32 lanes, lane ``l`` accumulating ``e[16j+l]`` in order; lanes
  reduced as ``a_i = s_i + s_(i+8)``, then pairs ``(a0+a1)+(a2+a3)`` and ``(a4+a5)+(a6+a7)``,
  then their sum;
* ``y = e * (1 / sum)``.

Erf (MLAS ``MlasErfKernelFma3``), elementwise, with ``a = min(|x|, 3.925)`` (onnxruntime 1.32;
older MLAS clamped at 3.725):

* ``|x| < 0.921875``: ``p(a**2)`` by Horner in ``fma`` (six coefficients), then ``fma(p, a, a)``;
* otherwise ``q = fma(q(a), a, a)`` (seven coefficients), and ``1 - exp(-q)`` with MLAS's
  second exp: ``k = fma(log2(e), -q, 1.5 * 2**23) - 1.5 * 2**23``, the two-part range reduction,
  a degree-6 polynomial, times ``2**k`` (a plain multiply: ``k >= -21`` here);
* the sign of ``x`` copied onto the result.

A float32 ``fma`` is computed in float64, where the product of two float32 is exact; the one
case where rounding the float64 sum to float32 differs from rounding the exact sum (a sum that
float64 rounded onto a float32 halfway point) is detected with the sum's exact error (TwoSum)
and corrected, so :func:`fma32` is the fma instruction bit for bit. The TIR kernels
(:mod:`qcompile.backends.mlas_float_kernels`) use that instruction, so interpreter and compiled
code agree exactly.
"""
from __future__ import annotations

import numpy as np

__all__ = ["fma32", "layer_norm", "softmax", "erf", "EXP_CONSTANTS", "ERF_CONSTANTS", "LN_LANES", "SOFTMAX_LANES"]

LN_LANES = 8
SOFTMAX_LANES = 16

# MLAS ``MlasExpConstants`` (compute.cpp): range clamp, rounding bias, log2(e), -ln2 split in
# two, and the polynomial poly_0 .. poly_4, poly_56 (poly_5 == poly_6 == 1).
EXP_CONSTANTS = {
    "lower_range": np.float32(-103.9720840454),
    "rounding_bias": np.float32(12582912.0),
    "log2_reciprocal": np.float32(1.44269504088896341),
    "log2_high": np.float32(-6.93145752e-1),
    "log2_low": np.float32(-1.42860677e-6),
    "poly": tuple(np.float32(float.fromhex(h)) for h in
                  ("0x1.694000p-10", "0x1.125edcp-7", "0x1.555b5ap-5", "0x1.555450p-3", "0x1.fffff6p-2",
                   "0x1.000000p+0", "0x1.000000p+0")),
}

# MLAS ``MlasErfConstants`` (erf.cpp): |x| clamp, the split between the two polynomials, the
# small-|x| polynomial in x**2, the large-|x| one in |x|, and the exp that finishes the latter.
ERF_CONSTANTS = {
    "upper_abs": np.float32(3.925),
    "split": np.float32(0.921875),
    "small": tuple(np.float32(v) for v in (-5.99104969e-4, 4.99339588e-3, -2.67667342e-2, 1.12818025e-1,
                                            -3.76124859e-1, 1.28379151e-1)),
    "big": tuple(np.float32(v) for v in (1.72948930e-5, -3.83208680e-4, 3.88393435e-3, -2.42545605e-2,
                                          1.06777847e-1, 6.34846687e-1, 1.28717512e-1)),
    "exp_lower": np.float32(-88.3762626647949),
    "exp_rounding": np.float32(1.25829120e+7),
    "exp_poly": tuple(np.float32(v) for v in (1.38319808e-3, 8.37550033e-3, 4.16689515e-2, 1.66664466e-1,
                                               4.99999851e-1, 1.0, 1.0)),
}

_F32, _F64 = np.float32, np.float64


def fma32(a, b, c) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, as the fma instruction (see the module docstring)."""
    a, b, c = (np.asarray(v, _F32).astype(_F64) for v in (a, b, c))
    product = a * b  # exact: 24 + 24 bits
    total = product + c
    bent = total - product  # TwoSum: total + error == product + c exactly
    error = (product - (total - bent)) + (c - bent)
    rounded = total.astype(_F32)
    gap = total - rounded.astype(_F64)  # exact
    toward = np.where(gap > 0, _F32(np.inf), _F32(-np.inf))
    neighbour = np.nextafter(rounded, toward)
    halfway = (gap != 0) & (2 * gap == neighbour.astype(_F64) - rounded.astype(_F64))
    # float64 landed exactly between two float32 and its own rounding error says which side
    # the exact value lies on: the float32 rounding of the exact value is the neighbour
    fix = halfway & (error != 0) & ((error > 0) == (gap > 0))
    return np.where(fix, neighbour, rounded)


# ---------------------------------------------------------------------------- LayerNorm
def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, epsilon: float, axis: int) -> np.ndarray:
    """LayerNormalization of float32 ``x`` over axes ``axis..last`` as onnxruntime computes it."""
    axis %= x.ndim
    n = int(np.prod(x.shape[axis:], dtype=np.int64))
    rows = np.ascontiguousarray(x, _F32).reshape(-1, n)
    gamma = np.broadcast_to(np.asarray(scale, _F32), x.shape[axis:]).reshape(n)
    beta = (np.zeros(n, _F32) if bias is None
            else np.broadcast_to(np.asarray(bias, _F32), x.shape[axis:]).reshape(n))
    eps = _F32(epsilon)
    y = _layer_norm_rows(rows, gamma, beta, eps) if n >= LN_LANES else _layer_norm_rows_welford(rows, gamma, beta, eps)
    return y.reshape(x.shape)


def _layer_norm_rows(rows, gamma, beta, eps):
    n = rows.shape[1]
    mean = (rows.astype(_F64).sum(axis=1) / n).astype(_F32)[:, None]
    d = rows - mean
    body = n - n % LN_LANES
    lanes = np.zeros((len(rows), LN_LANES), _F32)
    for k in range(0, body, LN_LANES):
        lanes = fma32(d[:, k:k + LN_LANES], d[:, k:k + LN_LANES], lanes)
    while lanes.shape[1] > 1:
        half = lanes.shape[1] // 2
        lanes = lanes[:, :half] + lanes[:, half:]
    ss = lanes[:, 0]
    quads = body + (n - body) // 4 * 4
    for k in range(body, quads):
        ss = ss + d[:, k] * d[:, k]
    for k in range(quads, n):
        ss = fma32(d[:, k], d[:, k], ss)
    inv = (_F32(1) / np.sqrt(ss / _F32(n) + eps))[:, None]
    return fma32(d * inv, gamma, beta)


def _layer_norm_rows_welford(rows, gamma, beta, eps):
    n = rows.shape[1]
    mean = np.zeros(len(rows), _F32)
    m2 = np.zeros(len(rows), _F32)
    for k in range(n):
        delta = rows[:, k] - mean
        mean = mean + delta / _F32(k + 1)
        m2 = m2 + delta * (rows[:, k] - mean)
    std = np.sqrt(m2 / _F32(n) + eps)[:, None]
    return (rows - mean[:, None]) / std * gamma + beta


# ---------------------------------------------------------------------------- Softmax
def exp_shifted(v: np.ndarray) -> np.ndarray:
    """MLAS's exp of ``v = x - max`` (float32, already shifted), clamp and polynomial included."""
    c = EXP_CONSTANTS
    v = np.maximum(c["lower_range"], np.asarray(v, _F32))
    k = fma32(v, c["log2_reciprocal"], c["rounding_bias"]) - c["rounding_bias"]
    r = fma32(k, c["log2_high"], v)
    r = fma32(k, c["log2_low"], r)
    p = np.full_like(r, c["poly"][0])
    for coeff in c["poly"][1:]:
        p = fma32(p, r, coeff)
    return (p.astype(_F64) * np.exp2(k.astype(_F64))).astype(_F32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax of float32 ``x`` along ``axis`` as onnxruntime's MLAS kernel computes it."""
    moved = np.moveaxis(np.asarray(x, _F32), axis, -1)
    n = moved.shape[-1]
    rows = np.ascontiguousarray(moved).reshape(-1, n)
    e = exp_shifted(rows + (-rows.max(axis=1, keepdims=True)))
    total = _lane_sum(e)
    y = e * (_F32(1) / total)[:, None]
    return np.moveaxis(y.reshape(moved.shape), -1, axis)


def _lane_sum(e: np.ndarray) -> np.ndarray:
    """Row sums of ``e`` in the order of MLAS's AVX-512 SumExp accumulator and reduction."""
    rows, n = e.shape
    padded = np.zeros((rows, -(-n // SOFTMAX_LANES) * SOFTMAX_LANES), _F32)
    padded[:, :n] = e
    lanes = np.zeros((rows, SOFTMAX_LANES), _F32)
    for j in range(0, padded.shape[1], SOFTMAX_LANES):
        lanes = lanes + padded[:, j:j + SOFTMAX_LANES]  # masked-out lanes add +0, a no-op
    a = lanes[:, :8] + lanes[:, 8:]
    pairs = a[:, 0::2] + a[:, 1::2]
    return (pairs[:, 0] + pairs[:, 1]) + (pairs[:, 2] + pairs[:, 3])


# ---------------------------------------------------------------------------- Erf
def erf(x: np.ndarray) -> np.ndarray:
    """The error function of float32 ``x`` as onnxruntime's MLAS FMA3 kernel computes it."""
    c = ERF_CONSTANTS
    x = np.asarray(x, _F32)
    a = np.minimum(np.abs(x), c["upper_abs"])
    p = np.full_like(a, c["small"][0])
    for coeff in c["small"][1:]:
        p = fma32(p, a * a, coeff)
    p = fma32(p, a, a)
    q = np.full_like(a, c["big"][0])
    for coeff in c["big"][1:]:
        q = fma32(q, a, coeff)
    q = np.maximum(-fma32(q, a, a), c["exp_lower"])
    k = fma32(EXP_CONSTANTS["log2_reciprocal"], q, c["exp_rounding"]) - c["exp_rounding"]
    f = fma32(k, EXP_CONSTANTS["log2_high"], q)
    f = fma32(k, EXP_CONSTANTS["log2_low"], f)
    e = np.full_like(a, c["exp_poly"][0])
    for coeff in c["exp_poly"][1:]:
        e = fma32(e, f, coeff)
    big = _F32(1) - e * np.exp2(k).astype(_F32)
    return np.copysign(np.where(a >= c["split"], big, p), x)
