"""Reference kernels of the integer-only ops ``IntLinear``, ``IntConv`` and ``Requantize``.

Merged into :data:`qcompile.interpreter.KERNELS`; semantics are documented in :mod:`qcompile.ops`.

Invariants:

* Activation codes are uint8 with zero point 128 (``q = u - 128``), as in the W8A8 path.
* Every value is an exact integer: products and sums are computed in int64 (or in float64 where
  every partial sum is below 2**53, which makes BLAS exact) and stored as int32; a result outside
  int32 wraps as it does in the compiled code.
* Rescales are dyadic: ``M = m * 2**(s - 31)`` with an int32 Q31 multiplier ``m`` and an int32
  shift ``s``; :func:`fixed_point_multiply` is, operation for operation, TVM's lowering of
  ``tirx.q_multiply_shift_per_axis`` with q = 31: ``x64 = int64(x) << max(s, 0)``;
  ``x64 = x64 * m``; ``t = max(-s, 0) + 31``; ``y = int32((x64 + (1 << (t - 1))) >> t)``
  (arithmetic shift: rounding half up, i.e. toward +inf on ties).
"""

from __future__ import annotations

import numpy as np

__all__ = ["INTEGER_KERNELS", "fixed_point_multiply", "dyadic", "int_linear", "int_conv", "requantize",
           "CODE_ZERO"]

CODE_ZERO = 128  # zero point of uint8 activation codes
_EXACT_F64 = 2**52  # |partial sums| below this are exact in float64


def dyadic(multiplier) -> tuple[np.ndarray, np.ndarray]:
    """Real multipliers ``M > 0`` -> (int32 m in [2**30, 2**31), int32 s) with M ~= m * 2**(s - 31).

    Multipliers below 2**-33 (their product with any int32 rounds to 0) give (0, 0).
    """
    mult = np.atleast_1d(np.asarray(multiplier, np.float64))
    if not np.all(np.isfinite(mult)) or np.any(mult <= 0):
        raise ValueError(f"dyadic multipliers must be finite and positive (got {mult.min()}..{mult.max()})")
    frac, exp = np.frexp(mult)  # mult = frac * 2**exp, frac in [0.5, 1)
    m = np.rint(frac * 2.0**31).astype(np.int64)
    carry = m == 2**31
    m = np.where(carry, 2**30, m)
    exp = exp + carry
    if np.any(exp > 31):
        raise ValueError(f"dyadic multiplier {mult.max()} is too large for an int32 rescale")
    tiny = exp < -32
    m = np.where(tiny, 0, m)
    exp = np.where(tiny, 0, exp)
    return m.astype(np.int32), exp.astype(np.int32)


def fixed_point_multiply(x: np.ndarray, m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """int32 ``x`` times ``m * 2**(s - 31)``, rounded half up; ``m``/``s`` broadcast against ``x``."""
    x64 = x.astype(np.int64) << np.maximum(s, 0).astype(np.int64)
    x64 = x64 * m.astype(np.int64)
    total = np.maximum(-s, 0).astype(np.int64) + 31
    return ((x64 + (np.int64(1) << (total - 1))) >> total).astype(np.int32)


def _wrap32(acc: np.ndarray) -> np.ndarray:
    return acc.astype(np.int64).astype(np.int32)


def int_linear(u: np.ndarray, qweight: np.ndarray, bias: np.ndarray | None = None,
               row_mult: np.ndarray | None = None) -> np.ndarray:
    """int32 ``sum_k (u - 128) * w[k, n] (* row_mult[row]) (+ bias[n])`` (wrapping like int32)."""
    q = u.reshape(-1, u.shape[-1]).astype(np.float64) - CODE_ZERO
    w = qweight.astype(np.float64)
    if u.shape[-1] * 127.0 * 128.0 < _EXACT_F64:
        acc = np.rint(q @ w).astype(np.int64)
    else:  # pragma: no cover - K beyond 2**38: exact but slow
        acc = q.astype(np.int64) @ qweight.astype(np.int64)
    if row_mult is not None:
        acc = _wrap32(acc) * row_mult.reshape(-1, 1).astype(np.int64)
    if bias is not None:
        acc = acc + bias.astype(np.int64)
    return _wrap32(acc).reshape(*u.shape[:-1], qweight.shape[1])


def int_conv(u, w, bias, strides, pads, dilations, group) -> np.ndarray:
    """int32 convolution (NCHW) of ``u - 128`` with int8 ``w``; padding is code 128 (real 0)."""
    from .interpreter import _pad, _windows  # the float kernel's window helpers (no import cycle)

    q = u.astype(np.int64) - CODE_ZERO
    r = u.ndim - 2
    win = _windows(_pad(q, pads, 0), w.shape[2:], strides, dilations)
    cin, cout = w.shape[1], w.shape[0] // group
    outs = []
    for gi in range(group):
        xg = win[:, gi * cin:(gi + 1) * cin].astype(np.float64)
        wg = w[gi * cout:(gi + 1) * cout].astype(np.float64)
        axes = ([1] + list(range(2 + r, 2 + 2 * r)), [1] + list(range(2, 2 + r)))
        outs.append(np.rint(np.tensordot(xg, wg, axes=axes)).astype(np.int64))  # exact: < 2**52
    acc = np.moveaxis(np.concatenate(outs, axis=-1), -1, 1)
    if bias is not None:
        acc = acc + bias.astype(np.int64).reshape((1, -1) + (1,) * r)
    return np.ascontiguousarray(_wrap32(acc))


def requantize(x, m, s, axis: int, out_dtype: str, qmin: int = -127, qmax: int = 127) -> np.ndarray:
    """Dyadic rescale of int32 (or uint8 codes) ``x``; per-channel ``m``/``s`` run along ``axis``.

    out "int32": the rescaled value; out "uint8": codes ``clip(r, qmin, qmax) + 128``.
    """
    q = x.astype(np.int32) - (CODE_ZERO if x.dtype == np.uint8 else 0)
    shape = [1] * x.ndim
    if m.size > 1:
        shape[axis % x.ndim] = m.size
    r = fixed_point_multiply(q, m.reshape(shape), s.reshape(shape))
    if out_dtype == "int32":
        return r
    return (np.clip(r, qmin, qmax) + CODE_ZERO).astype(np.uint8)


def _int_linear(g, n, a):
    return int_linear(a[0], a[1], a[2] if len(a) > 2 else None, a[3] if len(a) > 3 else None)


def _int_conv(g, n, a):
    at, r = n.attrs, a[0].ndim - 2
    return int_conv(a[0], a[1], a[2] if len(a) > 2 else None, at.get("strides") or (1,) * r,
                    at.get("pads") or (0,) * 2 * r, at.get("dilations") or (1,) * r, at.get("group", 1))


def _requantize(g, n, a):
    at = n.attrs
    return requantize(a[0], a[1], a[2], at.get("axis", -1), at["out_dtype"], at.get("qmin", -127),
                      at.get("qmax", 127))


INTEGER_KERNELS = {"IntLinear": _int_linear, "IntConv": _int_conv, "Requantize": _requantize}
