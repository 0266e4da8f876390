"""Reference kernels of the quantization ops (merged into :data:`qcompile.interpreter.KERNELS`).

Numerics are the ONNX specification's, bit for bit:

* QuantizeLinear: ``y = saturate(round_half_even(x / scale) + zero_point)`` computed in float32
  (division, not multiplication by a reciprocal), clamped to [qmin, qmax], stored as ``dtype``.
  ``scale`` and ``zero_point`` already broadcast against ``x`` (the frontend expands per-axis
  and blocked parameters). NaN (e.g. -inf / inf when a calibrated range was infinite, as in
  attention masks) quantizes to qmin, as onnxruntime does on x86; the spec leaves it open.
* DequantizeLinear: ``y = (float32(x) - float32(zero_point)) * scale``.
* DynamicQuantizeLinear: uint8; ``scale = (max(0, max x) - min(0, min x)) / 255``, replaced by 1
  when it is 0 (an all-zero input: ONNX leaves 0/0 open, onnxruntime uses 1, so do we);
  ``zero_point = saturate(round_half_even(0 - min / scale))``.
* MatMulInteger: ``(a - a_zp) @ (b - b_zp)`` in int32 (exact; wraps like int32 on overflow).
"""

from __future__ import annotations

import numpy as np

__all__ = ["QUANT_KERNELS", "quantize_linear", "dequantize_linear", "dynamic_quantize_linear", "matmul_integer"]


def quantize_linear(x, scale, zero_point, qmin: int, qmax: int, dtype: str) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zero_point.astype(np.float32)
    q = np.where(np.isnan(q), np.float32(qmin), q)
    return np.clip(q, qmin, qmax).astype(dtype)


def dequantize_linear(x, scale, zero_point) -> np.ndarray:
    diff = x.astype(np.float32) - zero_point.astype(np.float32)
    return (diff * scale.astype(np.float32)).astype(np.float32)


def dynamic_quantize_linear(x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = x.astype(np.float32)
    lo = np.minimum(np.float32(0), x.min(initial=np.float32(0)))
    hi = np.maximum(np.float32(0), x.max(initial=np.float32(0)))
    scale = np.float32((hi - lo) / np.float32(255))
    scale = np.float32(1) if scale == 0 else scale
    zp = np.clip(np.rint(np.float32(0) - lo / scale), 0, 255).astype(np.uint8)
    y = quantize_linear(x, np.asarray(scale), zp, 0, 255, "uint8")
    return y, np.asarray(scale, np.float32), np.asarray(zp, np.uint8)


def matmul_integer(a, b, a_zp=None, b_zp=None) -> np.ndarray:
    a32 = a.astype(np.int32) - (np.int32(0) if a_zp is None else a_zp.astype(np.int32).reshape(()))
    b32 = b.astype(np.int32)
    if b_zp is not None:
        b32 = b32 - b_zp.astype(np.int32).reshape(-1)
    return np.matmul(a32, b32).astype(np.int32)


def _q(g, n, a):
    return quantize_linear(a[0], a[1], a[2], n.attrs["qmin"], n.attrs["qmax"], n.attrs["dtype"])


def _dq(g, n, a):
    return dequantize_linear(a[0], a[1], a[2])


def _dyn(g, n, a):
    return list(dynamic_quantize_linear(a[0]))


def _mmi(g, n, a):
    return matmul_integer(*a)


QUANT_KERNELS = {"QuantizeLinear": _q, "DequantizeLinear": _dq, "DynamicQuantizeLinear": _dyn, "MatMulInteger": _mmi}
