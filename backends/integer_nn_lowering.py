"""Relax lowerings of the integer-only transformer ops (merged into :mod:`.relax_lowering`'s rules).

1. ``IntMatMul`` -> the scheduled batched GEMM of :mod:`.kernels` on int32 accumulators
   (operands widened in the kernel, zero points subtracted there); batch dims broadcast first.
2. ``IntSoftmax`` / ``Lut`` -> one TE function each (``emit_te``) from :mod:`.integer_nn_kernels`,
   scheduled by the target's row-reduction / fallback rules. ``IntLayerNorm`` -> row mean, row
   variance (TE), the integer square root (a scheduled loop kernel), then the normalisation (TE).
3. ``IntRowQuantize`` -> three TE functions: the per-row exponent r (a row max reduction), the
   multiplier ``2**r`` and the codes (elementwise arithmetic shifts by r).
4. ``IntDiv`` and ``IntReduceL2`` -> Relax integer ops (int64 multiply, floor_divide, sum) and
   the integer square root kernel.

Every lowering is exact integer arithmetic; see :mod:`qcompile.interpreter_integer_nn`.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from . import integer_nn_kernels as k

__all__ = ["INTEGER_NN_LOWERINGS"]

R = relax.op


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.ty.shape)


def _int_matmul(ctx, node):
    a, b = ctx.get(node.inputs[0]), ctx.get(node.inputs[1])
    sa, sb = _shape(a), _shape(b)
    (m, kk), n = sa[-2:], sb[-1]
    batch = tuple(np.broadcast_shapes(sa[:-2], sb[:-2]))
    count = math.prod(batch)

    def as3(x, mat):
        if _shape(x)[:-2] != batch:
            x = ctx.emit(R.broadcast_to(x, (*batch, *mat)))
        return ctx.emit(R.reshape(x, (count, *mat))) if len(_shape(x)) != 3 else x

    at = node.attrs
    params = (count, m, kk, n, str(a.ty.dtype), str(b.ty.dtype), int(at.get("a_zero", 0)), int(at.get("b_zero", 0)))
    y = ctx.call_kernel("int_batch_matmul_kernel", params, [as3(a, (m, kk)), as3(b, (kk, n))], (count, m, n),
                        "int32")
    out_shape = tuple(ctx.graph.type_of(node.outputs[0]).shape)
    return ctx.emit(R.reshape(y, out_shape)) if _shape(y) != out_shape else y


def _isqrt(ctx, v):
    """Integer square root of an int64 tensor, through the per-row loop kernel."""
    shape = _shape(v)
    rows = math.prod(shape)
    flat = ctx.emit(R.reshape(v, (rows,)))
    root = ctx.call_kernel("isqrt_kernel", (rows,), [flat], (rows,), "int64", builders=k)
    return ctx.emit(R.reshape(root, shape))


def _int_layer_norm(ctx, node):
    x, gamma, beta = (ctx.get(n) for n in node.inputs)
    pre, out_shift = int(node.attrs["pre_shift"]), int(node.attrs["out_shift"])
    mean = ctx.bb.emit_te(k.ln_mean_compute, x, primfunc_name_hint="int_ln_mean")
    var = ctx.bb.emit_te(k.ln_var_compute, x, mean, pre, primfunc_name_hint="int_ln_var")
    std = _isqrt(ctx, var)
    return ctx.bb.emit_te(k.ln_normalize_compute, x, mean, std, gamma, beta, pre, out_shift,
                          primfunc_name_hint="int_layer_norm")


def _int_softmax(ctx, node):
    x, table = (ctx.get(n) for n in node.inputs)
    return ctx.bb.emit_te(k.int_softmax_compute, x, table, int(node.attrs["mult"]), int(node.attrs["shift"]),
                          primfunc_name_hint="int_softmax")


def _lut(ctx, node):
    x, table = (ctx.get(n) for n in node.inputs)
    return ctx.bb.emit_te(k.lut_compute, x, table, int(node.attrs.get("offset", 0)), primfunc_name_hint="lut")


def _int_row_quantize(ctx, node):
    x = ctx.get(node.inputs[0])
    shift = ctx.bb.emit_te(k.row_shift_compute, x, int(node.attrs["max_shift"]), primfunc_name_hint="int_row_shift")
    mult = ctx.bb.emit_te(k.row_mult_compute, shift, primfunc_name_hint="int_row_mult")
    codes = ctx.bb.emit_te(k.row_codes_compute, x, shift, primfunc_name_hint="int_row_codes")
    return [codes, mult]


def _int_div(ctx, node):
    a, b = (ctx.emit(R.astype(ctx.get(n), "int64")) for n in node.inputs)
    num = ctx.emit(R.multiply(a, relax.const(2 * int(node.attrs["num"]), "int64")))
    den = ctx.emit(R.multiply(ctx.emit(R.maximum(b, relax.const(1, "int64"))), relax.const(int(node.attrs["den"]), "int64")))
    q = ctx.emit(R.floor_divide(ctx.emit(R.add(num, den)), ctx.emit(R.multiply(den, relax.const(2, "int64")))))
    return ctx.emit(R.astype(q, "int32"))


def _int_reduce_l2(ctx, node):
    x = ctx.emit(R.astype(ctx.get(node.inputs[0]), "int64"))
    axes = [int(a) for a in node.attrs["axes"]]
    total = ctx.emit(R.sum(ctx.emit(R.multiply(x, x)), axes, bool(node.attrs["keepdims"])))
    return ctx.emit(R.astype(_isqrt(ctx, total), "int32"))


INTEGER_NN_LOWERINGS = {
    "IntMatMul": (_int_matmul, frozenset({"a_zero", "b_zero"})),
    "IntLayerNorm": (_int_layer_norm, frozenset({"pre_shift", "out_shift"})),
    "IntSoftmax": (_int_softmax, frozenset({"mult", "shift"})),
    "Lut": (_lut, frozenset({"offset"})),
    "IntDiv": (_int_div, frozenset({"num", "den"})),
    "IntReduceL2": (_int_reduce_l2, frozenset({"axes", "keepdims"})),
    "IntRowQuantize": (_int_row_quantize, frozenset({"max_shift"})),
}
