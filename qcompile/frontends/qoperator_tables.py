"""256-entry lookup tables of onnxruntime's table-driven QOperator ops, bit for bit.

onnxruntime (``QlinearBuildLookupTable``) builds each table once: every code ``i`` is
dequantized in float32 (``x_s * (i - x_zp)``), transformed, and quantized by
``MlasQuantizeLinear`` (``rne(y / y_s) + y_zp``, saturated). The transforms:

* identity (QLinearConcat requantization), LeakyRelu ``x if x >= 0 else x * alpha``: plain
  float32, reproduced by numpy;
* Sigmoid: ``MlasComputeLogistic``, the rational approximation (Eigen's coefficients) that the
  x86 FMA3 kernel evaluates with fused multiply-adds. :func:`mlas_logistic` replays it with
  correctly rounded float32 fma (exact rational arithmetic), which matches onnxruntime's float
  Sigmoid on every input tried; ``1 / (1 + exp(-x))`` differs in about half the last bits.

QLinearSoftmax's table (``QlinearBuildLookupTableUint32``) holds shifted exponentials instead:
``float32(exp((i - 255 + shift) * x_s))`` in float64, ``shift = max(0, log(FLT_MAX / D) - 5) / x_s``
so that a row of ``D`` entries sums below FLT_MAX.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..interpreter_quant import dequantize_linear, quantize_linear
from .onnx_quant import QRANGE

__all__ = ["lookup_table", "mlas_logistic", "softmax_table"]

_F32 = np.float32
_ALPHA = [_F32(v) for v in (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
                            2.48287947061529e-01)]  # alpha_9 .. alpha_1
_BETA = [_F32(v) for v in (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
                           1.16817656904453e-01, 9.93151921023180e-01)]  # beta_10 .. beta_0


def _round32(value: Fraction) -> np.float32:
    """``value`` rounded to the nearest float32, ties to even (exact, no double rounding)."""
    near = _F32(float(value))
    candidates = (np.nextafter(near, _F32(-np.inf)), near, np.nextafter(near, _F32(np.inf)))
    return _F32(min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(np.asarray(c).view(np.int32)) & 1)))


def _fma32(a, b, c) -> np.float32:
    return _round32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def _logistic1(x: np.float32) -> np.float32:
    v = min(max(_F32(x), _F32(-18.0)), _F32(18.0))
    v2 = _F32(v * v)
    p = _fma32(v2, _ALPHA[0], _ALPHA[1])
    for coef in _ALPHA[2:]:
        p = _fma32(p, v2, coef)
    p = _F32(p * v)
    q = _fma32(v2, _BETA[0], _BETA[1])
    for coef in _BETA[2:]:
        q = _fma32(q, v2, coef)
    return min(max(_F32(_F32(p / q) + _F32(0.5)), _F32(0.0)), _F32(1.0))


def mlas_logistic(x: np.ndarray) -> np.ndarray:
    """onnxruntime's float32 Sigmoid (MLAS, x86 FMA3 kernel), elementwise; meant for small arrays."""
    return np.array([_logistic1(v) for v in np.asarray(x, _F32).reshape(-1)], _F32).reshape(np.shape(x))


def codes(logical: str) -> np.ndarray:
    """All 256 codes in table order: entry i is the code whose bit pattern is i."""
    return np.arange(256, dtype=np.uint8).view(QRANGE[logical][2])


def lookup_table(fn, x_s, x_zp, y_s, y_zp, logical: str) -> np.ndarray:
    """quantize(fn(dequantize(code))) for every code, in float32 as onnxruntime builds it."""
    qmin, qmax, storage = QRANGE[logical]
    y = fn(dequantize_linear(codes(logical), np.asarray(x_s, _F32), np.asarray(x_zp)))
    return quantize_linear(np.asarray(y, _F32), np.asarray(y_s, _F32), np.asarray(y_zp), qmin, qmax, storage)


def softmax_table(x_scale, reduce_len: int) -> np.ndarray:
    """onnxruntime's QLinearSoftmax exp table (float32 [256], entry i for ``x - max(x) = i - 255``)."""
    x_scale = float(_F32(x_scale))
    shift = max(0.0, float(np.log(np.float64(_F32(np.finfo(np.float32).max / _F32(reduce_len))))) - 5.0) / x_scale
    with np.errstate(over="ignore", invalid="ignore"):  # huge or infinite x_scale (attention masks): as in C++
        return np.exp((np.arange(256, dtype=np.float64) - 255 + shift) * x_scale).astype(_F32)
