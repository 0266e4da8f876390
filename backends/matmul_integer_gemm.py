"""Scheduled ``MatMulInteger`` with a constant 8-bit B: the int8 GEMM kernels of the W8A8 path.

``MatMulInteger(a, b, a_zp, b_zp)`` with b constant is rewritten, at lowering time, onto
:mod:`qcompile.backends.int8_gemm` (``vnni`` ``vpdpbusd`` on AVX-512 VNNI, ``sdot``/``smmla``
on arm64, a register-tiled portable GEMM otherwise), exactly:

* activations become uint8 codes ``u``: ``a`` itself (uint8) or ``a XOR 0x80`` (int8, i.e.
  ``a + 128``); the zero point moves with them: ``zu = a_zp`` or ``a_zp + 128`` (a_zp may be a
  run-time scalar, as DynamicQuantizeLinear's);
* weights ``w = b - b_zp`` (per tensor or per column) must fit in int8 (true for ORT's int8
  weights with b_zp = 0 and for uint8 weights with b_zp = 128); else no rewrite;
* ``sum_k (a - a_zp)(b - b_zp) = sum_k (u - zu) w = (acc - corr_kind) + (128 - zu) * colsum(w)``
  where ``acc - corr_kind == sum_k (u - 128) w`` is :mod:`.int8_gemm`'s invariant; the epilogue
  computes ``acc - corr_kind + (128 - zu) * colsum(w)`` with two int32 constants per column.

Everything is integer: the result is bit-identical to the unscheduled ``relax.op.matmul``.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax, te, tirx

from . import int8_gemm
from .kernels import _finish

__all__ = ["matmul_integer_kernel", "lower_matmul_integer_gemm"]

R = relax.op
_OPAQUE = 8


def matmul_integer_kernel(m: int, k: int, n: int, kind: str, target) -> tirx.PrimFunc:
    """Args: u uint8[m, k], w (``kind``'s packed layout), corr int32[n], colsum int32[n],
    zu int32[1], y int32[m, n] = acc - corr + (128 - zu) * colsum."""
    u, w, acc = int8_gemm.matmul(m, k, n, kind)
    corr = te.placeholder((n,), "int32", name="corr")
    colsum = te.placeholder((n,), "int32", name="colsum")
    zu = te.placeholder((1,), "int32", name="zu")
    y = te.compute((m, n), lambda i, j: acc[i, j] - corr[j] + (128 - zu[0]) * colsum[j], name="epilogue")
    schedule = int8_gemm.schedule(kind)
    return _finish([u, w, corr, colsum, zu, y], target, lambda s, p: schedule(s, "matmul", "epilogue", m, n, p))


def _const(ctx, name):
    return ctx.graph.constants.get(name) if name else None


def _weights(ctx, node):
    """int8 w = b - b_zp [K, N] when B and its zero point are constant and the result fits."""
    b = _const(ctx, node.inputs[1])
    if b is None or b.ndim != 2 or b.dtype not in (np.uint8, np.int8):
        return None
    b_zp = _const(ctx, node.inputs[3]) if len(node.inputs) > 3 else np.zeros((), np.int64)
    if b_zp is None:
        return None
    w = b.astype(np.int64) - b_zp.astype(np.int64).reshape(-1)
    return w.astype(np.int8) if w.min() >= -128 and w.max() <= 127 else None


def _code_zero_point(ctx, node, signed: bool):
    """int32[1] zu (a_zp, + 128 for int8 activations): a constant or a run-time scalar."""
    name = node.inputs[2] if len(node.inputs) > 2 else ""
    if not name:
        return relax.const(np.array([128 if signed else 0], np.int32))
    zp = ctx.emit(R.reshape(ctx.emit(R.astype(ctx.get(name), "int32")), (1,)))
    return ctx.emit(R.add(zp, relax.const(128, "int32"))) if signed else zp


def lower_matmul_integer_gemm(ctx, node):
    """The scheduled lowering of ``node`` (MatMulInteger), or None when the rewrite does not apply."""
    w = _weights(ctx, node)
    a = ctx.get(node.inputs[0])
    if w is None or str(a.ty.dtype) not in ("uint8", "int8") or len(a.ty.shape) < 2:
        return None
    if len(node.inputs) > 2 and node.inputs[2] and math.prod(ctx.graph.type_of(node.inputs[2]).shape) != 1:
        return None
    shape = [int(d) for d in a.ty.shape]
    (k, n), m = w.shape, math.prod(shape[:-1])
    signed = str(a.ty.dtype) == "int8"
    u = a if len(shape) == 2 else ctx.emit(R.reshape(a, (m, k)))
    if signed:  # a + 128 as uint8: the same bits as a XOR 0x80
        u = ctx.emit(R.astype(ctx.emit(R.add(ctx.emit(R.astype(u, "int32")), relax.const(128, "int32"))), "uint8"))
    kind = int8_gemm.select(ctx.target, m, k, n)
    corr = int8_gemm.zero_point_correction(kind, w).astype(np.int32)
    colsum = w.astype(np.int64).sum(axis=0).astype(np.int32)
    key = ("matmul_integer_gemm", (m, k, n, kind))
    gvar = ctx._kernels.get(key)  # pylint: disable=protected-access  (the context's kernel cache)
    if gvar is None:
        func = matmul_integer_kernel(m, k, n, kind, ctx.target).with_attr("op_pattern", _OPAQUE)
        gvar = ctx.bb.add_func(func, f"matmul_integer_{len(ctx._kernels)}")
        ctx._kernels[key] = gvar  # pylint: disable=protected-access
    args = [u, relax.const(int8_gemm.pack(kind, w)), relax.const(corr), relax.const(colsum),
            _code_zero_point(ctx, node, signed)]
    y = ctx.emit(relax.call_tir(gvar, args, relax.TensorType((m, n), "int32")))
    return y if len(shape) == 2 else ctx.emit(R.reshape(y, (*shape[:-1], n)))
