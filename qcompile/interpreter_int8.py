"""Reference kernels of the W8A8 ops ``QuantizeAct`` and ``Int8Linear`` (see :mod:`qcompile.ops`).

Merged into :data:`qcompile.interpreter.KERNELS`. Invariants: activation codes are uint8 with
zero point 128 (``u = q + 128``, ``q`` in [-127, 127]); rounding is half to even (``np.rint``);
every float step is float32 in the order the compiled kernels use
(:mod:`qcompile.backends.int8_kernels`), so the integer codes match the compiled ones exactly;
products accumulate exactly (float64 BLAS here: every partial sum is an integer below 2**53 in
magnitude, so exact in any order; int32 in the kernels: |acc| <= K * 128 * 127 must stay below
2**31, i.e. K <= 132,000).
"""

from __future__ import annotations

import numpy as np

__all__ = ["INT8_KERNELS", "AMAX_FLOOR", "act_qmax", "quantize_rows", "quantize_static", "int8_linear"]

AMAX_FLOOR = np.float32(1e-8)
_QMAX = np.float32(127)


def act_qmax(bits: int = 8) -> np.float32:
    """Largest activation code magnitude of ``QuantizeAct`` with attr ``bits``: 127 or 7."""
    if bits not in (4, 8):
        raise ValueError(f"activation codes are 4 or 8 bits (got {bits})")
    return np.float32(2 ** (bits - 1) - 1)


def _codes(v: np.ndarray, qmax=_QMAX) -> np.ndarray:
    return (np.clip(np.rint(v), -qmax, qmax).astype(np.int32) + 128).astype(np.uint8)


def quantize_rows(x: np.ndarray, qmax=_QMAX) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic per-row (last axis) symmetric quantization -> (u uint8, scale float32[..., 1])."""
    x = x.astype(np.float32, copy=False)
    qmax = np.float32(qmax)
    amax = np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), AMAX_FLOOR)
    inv = (qmax / amax).astype(np.float32)
    return _codes(x * inv, qmax), (amax / qmax).astype(np.float32)


def quantize_static(x: np.ndarray, scale: float, qmax=_QMAX) -> tuple[np.ndarray, np.ndarray]:
    """Static per-tensor quantization with ``scale`` -> (u uint8, scale float32[..., 1])."""
    inv = np.float32(1) / np.float32(scale)
    u = _codes(x.astype(np.float32, copy=False) * inv, np.float32(qmax))
    return u, np.full(x.shape[:-1] + (1,), np.float32(scale), np.float32)


def int8_linear(u, xscale, qweight, wscale, bias=None) -> np.ndarray:
    """float32(sum_k (u - 128) * w) * (xscale * wscale) (+ bias), int accumulation exact."""
    # exact: |acc| <= K * 128 * 128 < 2**53 (an int64 matmul has no BLAS path and is ~30x slower)
    acc = np.matmul(u.astype(np.float64) - 128, qweight.astype(np.float64))
    y = acc.astype(np.float32) * (xscale.astype(np.float32) * wscale.astype(np.float32))
    return (y + bias if bias is not None else y).astype(np.float32)


def _quantize_act(g, n, a):
    qmax = act_qmax(n.attrs.get("bits", 8))
    if n.attrs.get("mode", "dynamic") == "static":
        return list(quantize_static(a[0], n.attrs["scale"], qmax))
    return list(quantize_rows(a[0], qmax))


def _int8_linear(g, n, a):
    return int8_linear(a[0], a[1], a[2], a[3], a[4] if len(a) > 4 else None)


INT8_KERNELS = {"QuantizeAct": _quantize_act, "Int8Linear": _int8_linear}
