"""Reference kernels of the integer-only transformer ops (I-BERT style, no float anywhere).

``IntMatMul``, ``IntLayerNorm``, ``IntSoftmax``, ``Lut``, ``IntDiv``, ``IntReduceL2`` and
``IntRowQuantize``; merged
into :data:`qcompile.interpreter.KERNELS`, semantics in :mod:`qcompile.ops`. Every function
here is written as the exact sequence of integer operations that the compiled TIR performs
(:mod:`qcompile.backends.integer_nn_kernels`), so the two agree bit for bit:

* int64 where a product or a sum can leave int32, int32 elsewhere;
* divisions are floor divisions of a non-negative numerator by a positive denominator;
* ``>>`` is an arithmetic shift (floor), rounding is "add half, then shift" (half up);
* :func:`isqrt` is a fixed sequence: bit length by a 6-step binary search, start value
  ``2**ceil(bits / 2)`` (never below the root), then :data:`NEWTON_STEPS` monotone Newton
  steps ``x = min(x, (x + v // x) >> 1)``; exact floor square root for every ``v < 2**62``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["INTEGER_NN_KERNELS", "isqrt", "bit_length", "int_layer_norm", "int_softmax", "lut", "int_div",
           "int_matmul", "int_reduce_l2", "int_row_quantize", "NEWTON_STEPS", "SOFTMAX_OUT_BITS", "DIFF_CAP",
           "ROW_CODE_BITS"]

NEWTON_STEPS = 6
SOFTMAX_OUT_BITS = 15  # IntSoftmax output: probabilities at scale 2**-15
DIFF_CAP = 1 << 24  # IntSoftmax clamps max - x here before rescaling it (no int64 overflow)
VAR_BITS = 16  # IntLayerNorm: the variance is scaled by 2**16 before its square root (std * 2**8)
INV_BITS = 46  # IntLayerNorm: per-row reciprocal 2**46 // std
NORM_DROP = 16  # IntLayerNorm: (c * inv) >> 16 = c / std * 2**22
ROW_CODE_BITS = 7  # IntRowQuantize: a row's largest |x| is shifted below 2**7 (int8 codes)


def _rshift_round(x: np.ndarray, shift: int) -> np.ndarray:
    """Round-half-up arithmetic right shift of int64 ``x`` by a compile-time ``shift >= 0``."""
    if shift <= 0:
        return x
    return (x + (np.int64(1) << np.int64(shift - 1))) >> np.int64(shift)


def bit_length(v: np.ndarray) -> np.ndarray:
    """Number of significant bits of non-negative int64 ``v`` (0 for 0), by binary search."""
    t = v.astype(np.int64)
    b = np.zeros_like(t)
    for step in (32, 16, 8, 4, 2, 1):
        hit = t >= (np.int64(1) << np.int64(step))
        t = np.where(hit, t >> np.int64(step), t)
        b = np.where(hit, b + step, b)
    return b + (t >= 1)


def isqrt(v: np.ndarray) -> np.ndarray:
    """floor(sqrt(v)) of non-negative int64 ``v`` (< 2**62), at least 1 (see module docstring)."""
    v = v.astype(np.int64)
    x = np.int64(1) << ((bit_length(v) + 1) >> 1)
    for _ in range(NEWTON_STEPS):
        x = np.minimum(x, (x + v // x) >> np.int64(1))
        x = np.maximum(x, np.int64(1))
    return x


def int_layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, pre_shift: int, out_shift: int) -> np.ndarray:
    """Integer LayerNorm over the last axis of int32 ``x``: int32 ``gamma' * c / std >> out_shift + beta'``.

    ``c = round((x - mean) / 2**pre_shift)``; std = isqrt(sum(c**2) * 2**16 // N) (= std(c) * 2**8);
    ``n = (c * (2**46 // std)) >> 16`` (= c / std(c) * 2**22); out = round(n * gamma' / 2**out_shift) + beta'.
    """
    n = x.shape[-1]
    x64 = x.astype(np.int64)
    mean = (x64.sum(axis=-1, keepdims=True) + n // 2) // n
    c = _rshift_round(x64 - mean, pre_shift)
    var = (c * c).sum(axis=-1, keepdims=True)
    std = isqrt((var << np.int64(VAR_BITS)) // n)
    inv = (np.int64(1) << np.int64(INV_BITS)) // std
    norm = (c * inv) >> np.int64(NORM_DROP)
    out = _rshift_round(norm * gamma.astype(np.int64), out_shift) + beta.astype(np.int64)
    return out.astype(np.int32)


def int_softmax(x: np.ndarray, table: np.ndarray, mult: int, shift: int) -> np.ndarray:
    """Integer softmax over the last axis of int32 ``x``: int32 probabilities at scale 2**-15.

    ``d = min(max - x, 2**24)``; ``e = table[min(fpm(d, mult, shift), len - 1)]`` (table[i] =
    round(2**15 * exp(-i * step))); ``r = 2**30 // sum(e)``; ``p = (e * r + 2**14) >> 15``.
    """
    from .interpreter_integer import fixed_point_multiply

    x = x.astype(np.int32)
    d = np.minimum(x.max(axis=-1, keepdims=True) - x, np.int32(DIFF_CAP))
    idx = np.minimum(fixed_point_multiply(d, np.int32(mult), np.int32(shift)), np.int32(table.size - 1))
    e = table.astype(np.int32)[idx]
    total = e.sum(axis=-1, keepdims=True, dtype=np.int32)
    r = np.int32(1 << 30) // total
    half = np.int32(1 << (SOFTMAX_OUT_BITS - 1))
    return ((e * r + half) >> np.int32(SOFTMAX_OUT_BITS)).astype(np.int32)


def lut(x: np.ndarray, table: np.ndarray, offset: int) -> np.ndarray:
    """``table[clip(int32(x) + offset, 0, len - 1)]`` (the table's dtype)."""
    idx = np.clip(x.astype(np.int32) + np.int32(offset), 0, table.size - 1)
    return table[idx]


def int_div(a: np.ndarray, b: np.ndarray, num: int, den: int) -> np.ndarray:
    """int32 ``round_half_up(a * num / (max(b, 1) * den))`` with int64 intermediates (broadcasting)."""
    a64 = a.astype(np.int64) * np.int64(num)
    b64 = np.maximum(b.astype(np.int64), 1) * np.int64(den)
    return ((2 * a64 + b64) // (2 * b64)).astype(np.int32)


def int_matmul(a: np.ndarray, b: np.ndarray, a_zero: int, b_zero: int) -> np.ndarray:
    """int32 ``(a - a_zero) @ (b - b_zero)`` (numpy matmul broadcasting), exact."""
    qa = a.astype(np.float64) - a_zero
    qb = b.astype(np.float64) - b_zero
    bound = np.abs(qa).max(initial=0) * np.abs(qb).max(initial=0) * a.shape[-1]
    if bound < 2.0**52:  # every partial sum is an exact float64 integer
        acc = np.rint(np.matmul(qa, qb)).astype(np.int64)
    else:  # pragma: no cover - huge operands
        acc = np.matmul(a.astype(np.int64) - a_zero, b.astype(np.int64) - b_zero)
    return acc.astype(np.int32)


def int_reduce_l2(x: np.ndarray, axes, keepdims: bool) -> np.ndarray:
    """int32 ``isqrt(sum(x**2))`` over ``axes`` (int64 sum)."""
    x64 = x.astype(np.int64)
    return isqrt((x64 * x64).sum(axis=tuple(axes), keepdims=keepdims)).astype(np.int32)


def int_row_quantize(x: np.ndarray, max_shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic power-of-two codes per row (last axis) of int32 ``x``: (uint8 codes, int32 ``2**r`` [..., 1]).

    ``a = max |x|`` over the row (int32); ``r = sum_{j=7}^{6 + max_shift} [a >= 2**j]`` (=
    ``clip(bit_length(a) - 7, 0, max_shift)``); ``mult = 1 << r``; codes
    ``clip((x + (mult >> 1)) // mult, -127, 127) + 128``, so ``x ~= (codes - 128) * mult``.
    """
    x = x.astype(np.int32)
    a = np.maximum(x, -x).max(axis=-1, keepdims=True)
    r = np.zeros_like(a)
    for j in range(ROW_CODE_BITS, ROW_CODE_BITS + max_shift):
        r = r + (a >= np.int32(1 << j)).astype(np.int32)
    mult = np.left_shift(np.int32(1), r).astype(np.int32)
    q = (x + (mult >> np.int32(1))) // mult
    return (np.clip(q, -127, 127) + 128).astype(np.uint8), mult


INTEGER_NN_KERNELS = {
    "IntMatMul": lambda g, n, a: int_matmul(a[0], a[1], n.attrs.get("a_zero", 0), n.attrs.get("b_zero", 0)),
    "IntLayerNorm": lambda g, n, a: int_layer_norm(a[0], a[1], a[2], n.attrs["pre_shift"], n.attrs["out_shift"]),
    "IntSoftmax": lambda g, n, a: int_softmax(a[0], a[1], n.attrs["mult"], n.attrs["shift"]),
    "Lut": lambda g, n, a: lut(a[0], a[1], n.attrs.get("offset", 0)),
    "IntDiv": lambda g, n, a: int_div(a[0], a[1], n.attrs["num"], n.attrs["den"]),
    "IntReduceL2": lambda g, n, a: int_reduce_l2(a[0], n.attrs["axes"], bool(n.attrs["keepdims"])),
    "IntRowQuantize": lambda g, n, a: int_row_quantize(a[0], n.attrs["max_shift"]),
}
