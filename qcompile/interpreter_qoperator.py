"""Reference kernels of the QOperator ops ``ConvInteger``, ``QLinearAdd``, ``QLinearMul`` and
``QLinearAveragePool``.

Merged into :data:`qcompile.interpreter.KERNELS`; semantics in :mod:`qcompile.ops`.

* ConvInteger: ONNX ConvInteger, ``conv(x - x_zp, w - w_zp)`` with int32 accumulation;
  padding holds the real value 0 (code ``x_zp``), as onnxruntime pads. Exact: computed in
  float64 over integers (every partial sum is far below 2**53) by the integer-only kernel
  :func:`qcompile.interpreter_integer.int_conv`; a result outside int32 wraps.
* QLinearAdd: onnxruntime's x86 kernel (MLAS ``MlasQLinearAddKernelAvx2Helper``) in float32:
  ``t = fma(b, rb, fixed); t = fma(a, ra, t); y = saturate(rne(t))`` where ``a``/``b`` are
  the raw codes. When onnxruntime's broadcast loop hands the kernel one operand as a scalar
  per span (:func:`span_scalar`: its last dimension is 1 while the output's is not), that
  operand's term is folded into the constant first, with a plain multiply and add:
  ``fixed' = fixed + b * rb``; ``y = rne(fma(a, ra, fixed'))``.
  A float32 fma is emulated as ``float32(float64(x) * r + c)``: the product of an 8-bit code
  and a float32 is exact in float64, so only the (vanishingly rare) double rounding of the sum
  could differ from a true fma.
* QLinearMul: MLAS's SSE2 kernel: ``p = (a - a_zp) * (b - b_zp)`` exactly in int32, then
  ``t = float32(p) * ratio`` and ``t = t + float32(c_zp)``, each rounded to float32 (no fma),
  ``y = saturate(rne(t))``.
* QLinearAveragePool: onnxruntime's ``QLinearPool2DTask`` in float32: codes dequantized
  (``x_s * (x - x_zp)``), summed one window element after the other (h-major, padding skipped),
  divided by the number of elements inside the input (the whole window with
  ``count_include_pad``), then ``rne(y / y_s + y_zp)`` saturated
  (the zero point is added before rounding, unlike QuantizeLinear).
* QLinearSoftmax: onnxruntime's ``QlinearSoftmaxCPU<uint8_t>`` along the last axis: with
  ``e = table[x - max(x) + 255]`` (float32; the table is built at import), the row sum
  ``s = e_0 + e_1 + ...`` is accumulated in float32 in index order, and
  ``y = min(rne((e * y_multiplier) / s) + y_zero_point, 255)``, each operation rounded to
  float32 (``y_multiplier = floor(1 / y_scale)``). A NaN quotient (an infinite ``x_scale``
  makes the table's last entry ``0 * inf``: calibrated attention masks do) gives the code 0,
  whatever the zero point (onnxruntime 1.32 on x86-64, measured).
"""

from __future__ import annotations

import numpy as np

from .interpreter_integer import CODE_ZERO, int_conv

__all__ = ["QOPERATOR_KERNELS", "conv_integer", "qlinear_add", "span_scalar", "qlinear_mul", "qlinear_average_pool",
           "pool_counts", "pool_output_size", "qlinear_softmax", "sequential_sum"]

_F32, _F64 = np.float32, np.float64


def conv_integer(x, w, x_zp, w_zp, strides, pads, dilations, group) -> np.ndarray:
    """int32 ``conv(x - x_zp, w - w_zp)`` (NCHW); ``w_zp`` per tensor or per output channel."""
    xz = np.int64(0) if x_zp is None else np.asarray(x_zp, np.int64).reshape(())
    wz = np.zeros(1, np.int64) if w_zp is None else np.asarray(w_zp, np.int64).reshape(-1)
    w64 = w.astype(np.int64) - wz.reshape((-1,) + (1,) * (w.ndim - 1))
    return int_conv(x.astype(np.int64) - xz + CODE_ZERO, w64, None, strides, pads, dilations, group)


def _fma32(x, ratio, c):
    return (np.asarray(x, _F64) * _F64(ratio) + np.asarray(c, _F32).astype(_F64)).astype(_F32)


def span_scalar(shape, out_shape) -> bool:
    """Whether onnxruntime's broadcast loop passes an operand of ``shape`` as one scalar per span."""
    return (shape[-1] if shape else 1) == 1 and (out_shape[-1] if out_shape else 1) > 1


def qlinear_add(a, b, a_ratio, b_ratio, fixed, qmin, qmax, dtype) -> np.ndarray:
    fixed = _F32(fixed)
    out = np.broadcast_shapes(a.shape, b.shape)
    if span_scalar(b.shape, out) and not span_scalar(a.shape, out):
        t = _fma32(a, a_ratio, fixed + b.astype(_F32) * _F32(b_ratio))
    elif span_scalar(a.shape, out) and not span_scalar(b.shape, out):
        t = _fma32(b, b_ratio, fixed + a.astype(_F32) * _F32(a_ratio))
    else:
        t = _fma32(a, a_ratio, _fma32(b, b_ratio, fixed))
    return np.clip(np.rint(np.broadcast_to(t, out)), qmin, qmax).astype(dtype)


def qlinear_mul(a, b, a_zp, b_zp, ratio, c_zp, qmin, qmax, dtype) -> np.ndarray:
    p = (a.astype(np.int32) - np.int32(a_zp)) * (b.astype(np.int32) - np.int32(b_zp))
    t = p.astype(_F32) * _F32(ratio) + _F32(c_zp)
    return np.clip(np.rint(t), qmin, qmax).astype(dtype)


def pool_output_size(size: int, k: int, stride: int, pad_begin: int, pad_end: int) -> int:
    return (size + pad_begin + pad_end - k) // stride + 1


def pool_counts(spatial, kernel, strides, pads, include_pad: bool = False) -> np.ndarray:
    """float32 [OH, OW]: the divisor of each output, the number of its window elements inside
    the input (or the whole window when ``include_pad``)."""
    per_axis = []
    for i, (d, k, s) in enumerate(zip(spatial, kernel, strides)):
        start = np.arange(pool_output_size(d, k, s, pads[i], pads[i + len(kernel)])) * s - pads[i]
        per_axis.append(np.full(start.shape, k) if include_pad else np.minimum(start + k, d) - np.maximum(start, 0))
    return np.multiply.outer(*per_axis).astype(_F32)


def qlinear_average_pool(x, x_s, x_zp, y_s, y_zp, kernel, strides, pads, include_pad, qmin, qmax, dtype) -> np.ndarray:
    xd = (x.astype(_F32) - _F32(x_zp)) * _F32(x_s)
    xp = np.pad(xd, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    oh, ow = (pool_output_size(x.shape[2 + i], kernel[i], strides[i], pads[i], pads[i + 2]) for i in range(2))
    acc = np.zeros(x.shape[:2] + (oh, ow), _F32)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            acc = acc + xp[:, :, i:i + (oh - 1) * strides[0] + 1:strides[0], j:j + (ow - 1) * strides[1] + 1:strides[1]]
    y = acc / pool_counts(x.shape[2:], kernel, strides, pads, include_pad)
    t = y / _F32(y_s) + _F32(y_zp)
    return np.clip(np.rint(t), qmin, qmax).astype(dtype)


def sequential_sum(x: np.ndarray) -> np.ndarray:
    """float32 sum over the last axis, ``((x_0 + x_1) + x_2) + ...``: each add rounded to float32."""
    acc = np.zeros(x.shape[:-1], _F32)
    for k in range(x.shape[-1]):
        acc = acc + x[..., k]
    return acc


def qlinear_softmax(x, table, y_multiplier, y_zero_point) -> np.ndarray:
    """uint8 softmax along the last axis (onnxruntime's kernel, see the module docstring)."""
    index = x.astype(np.int32) - x.max(axis=-1, keepdims=True).astype(np.int32) + 255
    e = np.asarray(table, _F32)[index]
    with np.errstate(invalid="ignore"):
        t = (e * _F32(y_multiplier)) / sequential_sum(e)[..., None]
    y = np.minimum(np.rint(t) + _F32(y_zero_point), _F32(255))
    return np.where(np.isnan(y), _F32(0), y).astype(np.uint8)


def _conv_integer(g, n, a):
    at, r = n.attrs, a[0].ndim - 2
    args = list(a) + [None] * (4 - len(a))
    return conv_integer(*args[:4], at.get("strides") or (1,) * r, at.get("pads") or (0,) * 2 * r,
                        at.get("dilations") or (1,) * r, at.get("group", 1))


def _qlinear_add(g, n, a):
    at = n.attrs
    return qlinear_add(a[0], a[1], at["a_ratio"], at["b_ratio"], at["fixed"], at["qmin"], at["qmax"], at["dtype"])


def _qlinear_mul(g, n, a):
    at = n.attrs
    return qlinear_mul(a[0], a[1], at["a_zero_point"], at["b_zero_point"], at["ratio"], at["c_zero_point"], at["qmin"],
                       at["qmax"], at["dtype"])


def _qlinear_average_pool(g, n, a):
    at = n.attrs
    return qlinear_average_pool(a[0], at["x_scale"], at["x_zero_point"], at["y_scale"], at["y_zero_point"],
                                tuple(at["kernel_shape"]), tuple(at["strides"]), tuple(at["pads"]),
                                bool(at.get("count_include_pad", False)), at["qmin"], at["qmax"], at["dtype"])


def _qlinear_softmax(g, n, a):
    return qlinear_softmax(a[0], a[1], n.attrs["y_multiplier"], n.attrs["y_zero_point"])


QOPERATOR_KERNELS = {"ConvInteger": _conv_integer, "QLinearAdd": _qlinear_add, "QLinearMul": _qlinear_mul,
                     "QLinearAveragePool": _qlinear_average_pool, "QLinearSoftmax": _qlinear_softmax}
