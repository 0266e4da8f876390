"""Relax lowerings of the QOperator ops (merged into :mod:`.relax_lowering`'s rule table).

Numerics equal :mod:`qcompile.interpreter_qoperator` bit for bit:

* ConvInteger: operands widened to int32 and zero points subtracted, then ``conv2d`` with
  ``out_dtype="int32"``; zero padding of ``x - x_zp`` is padding with the code ``x_zp``.
* QLinearAdd: each float32 fused multiply-add is ``float32(float64(code) * r + c)``: the
  product is exact in float64, so an FMA contraction of the float64 multiply and add by LLVM
  gives the same bits; ``relax.op.round`` is round half to even.
* QLinearMul: the float32 product is widened to float64 before the zero point is added (exact,
  then rounded to float32 once): LLVM cannot contract a multiply and an add of different types
  into an FMA, which would round differently from onnxruntime's separate multiply and add.
* QLinearAveragePool: the window sum is a chain of float32 adds, each computed in float64 and
  rounded back to float32 (the same bits as a float32 add): the casts pin the order, which the
  host target's ``fast-math-reassoc`` could otherwise change.
* QLinearSoftmax: rows of the last axis go to the hand-written kernel of
  :mod:`.qoperator_kernels` (float32 steps pinned the same way).
"""

from __future__ import annotations

import math

from tvm import relax

from qcompile.errors import UnsupportedOpError
from qcompile.interpreter_qoperator import pool_counts, span_scalar

from . import qoperator_kernels

__all__ = ["QOPERATOR_LOWERINGS"]

R = relax.op


def _i32_minus(ctx, x, zp, view=None):
    x = ctx.emit(R.astype(x, "int32"))
    if zp is None:
        return x
    zp = ctx.emit(R.astype(zp, "int32"))
    if view is not None:
        zp = ctx.emit(R.reshape(zp, view))
    return ctx.emit(R.subtract(x, zp))


def _ints(node, key, default):
    return [int(v) for v in (node.attrs.get(key) or default)]


def _conv_integer(ctx, node):
    ins = list(node.inputs) + [""] * (4 - len(node.inputs))
    x, w = ctx.get(ins[0]), ctx.get(ins[1])
    if len(x.ty.shape) != 4:
        raise UnsupportedOpError(node.op, node.name, "only 2-D (NCHW) ConvInteger is lowered")
    w_zp = ctx.get(ins[3]) if ins[3] else None
    w_view = (-1, 1, 1, 1) if w_zp is not None and len(w_zp.ty.shape) == 1 else None
    x32 = _i32_minus(ctx, x, ctx.get(ins[2]) if ins[2] else None)
    w32 = _i32_minus(ctx, w, w_zp, w_view)
    return ctx.emit(R.nn.conv2d(x32, w32, strides=_ints(node, "strides", (1, 1)), padding=_ints(node, "pads", (0,) * 4),
                                dilation=_ints(node, "dilations", (1, 1)), groups=int(node.attrs.get("group", 1)),
                                out_dtype="int32"))


def _fma32(ctx, x, ratio: float, c):
    """float32(float64(x) * ratio + float64(c))."""
    x64 = ctx.emit(R.astype(x, "float64"))
    prod = ctx.emit(R.multiply(x64, relax.const(float(ratio), "float64")))
    return ctx.emit(R.astype(ctx.emit(R.add(prod, ctx.emit(R.astype(c, "float64")))), "float32"))


def _f32(value: float):
    return relax.const(value, "float32")


def _add32(ctx, a, b):
    """float32 a + b with its rounding pinned (see the module docstring)."""
    s = ctx.emit(R.add(ctx.emit(R.astype(a, "float64")), ctx.emit(R.astype(b, "float64"))))
    return ctx.emit(R.astype(s, "float32"))


def _qlinear_add(ctx, node):
    a, b = ctx.get(node.inputs[0]), ctx.get(node.inputs[1])
    at = node.attrs
    ra, rb, fixed = float(at["a_ratio"]), float(at["b_ratio"]), _f32(float(at["fixed"]))
    out_shape = list(ctx.graph.type_of(node.outputs[0]).shape)
    scalar_a, scalar_b = (span_scalar([int(d) for d in v.ty.shape], out_shape) for v in (a, b))
    if scalar_a != scalar_b:  # fixed + s * r, multiply and add each rounded (interpreter_qoperator)
        (s, rs), (v, rv) = ((a, ra), (b, rb)) if scalar_a else ((b, rb), (a, ra))
        folded = _add32(ctx, fixed, ctx.emit(R.multiply(ctx.emit(R.astype(s, "float32")), _f32(rs))))
        t = _fma32(ctx, v, rv, folded)
    else:
        t = _fma32(ctx, a, ra, _fma32(ctx, b, rb, fixed))
    t = ctx.emit(R.round(t))
    t = ctx.emit(R.minimum(ctx.emit(R.maximum(t, _f32(float(at["qmin"])))), _f32(float(at["qmax"]))))
    if [int(d) for d in t.ty.shape] != out_shape:
        t = ctx.emit(R.broadcast_to(t, out_shape))
    return ctx.emit(R.astype(t, str(at["dtype"])))


def _qlinear_mul(ctx, node):
    at = node.attrs
    a = _i32_minus(ctx, ctx.get(node.inputs[0]), relax.const(int(at["a_zero_point"]), "int32"))
    b = _i32_minus(ctx, ctx.get(node.inputs[1]), relax.const(int(at["b_zero_point"]), "int32"))
    prod = ctx.emit(R.astype(ctx.emit(R.multiply(a, b)), "float32"))
    t = ctx.emit(R.astype(ctx.emit(R.multiply(prod, _f32(float(at["ratio"])))), "float64"))
    t = ctx.emit(R.astype(ctx.emit(R.add(t, relax.const(float(at["c_zero_point"]), "float64"))), "float32"))
    t = ctx.emit(R.round(t))
    t = ctx.emit(R.minimum(ctx.emit(R.maximum(t, _f32(float(at["qmin"])))), _f32(float(at["qmax"]))))
    return ctx.emit(R.astype(t, str(at["dtype"])))


def _qlinear_average_pool(ctx, node):
    at = node.attrs
    x = ctx.get(node.inputs[0])
    shape = [int(d) for d in x.ty.shape]
    (kh, kw), (sh, sw), pads = at["kernel_shape"], at["strides"], [int(p) for p in at["pads"]]
    out = list(ctx.graph.type_of(node.outputs[0]).shape)
    xd = ctx.emit(R.subtract(ctx.emit(R.astype(x, "float32")), _f32(float(at["x_zero_point"]))))
    xd = ctx.emit(R.multiply(xd, _f32(float(at["x_scale"]))))
    if any(pads):
        xd = ctx.emit(R.nn.pad(xd, [0, 0, 0, 0, pads[0], pads[2], pads[1], pads[3]]))
    acc = None
    for i in range(kh):
        for j in range(kw):
            window = ctx.emit(R.strided_slice(xd, axes=[2, 3], begin=[i, j],
                                              end=[i + (out[2] - 1) * sh + 1, j + (out[3] - 1) * sw + 1],
                                              strides=[sh, sw]))
            acc = window if acc is None else _add32(ctx, acc, window)
    counts = relax.const(pool_counts(shape[2:], (kh, kw), (sh, sw), pads, bool(at.get("count_include_pad", False))))
    y = ctx.emit(R.divide(ctx.emit(R.divide(acc, counts)), _f32(float(at["y_scale"]))))
    t = ctx.emit(R.round(_add32(ctx, y, _f32(float(at["y_zero_point"])))))
    t = ctx.emit(R.minimum(ctx.emit(R.maximum(t, _f32(float(at["qmin"])))), _f32(float(at["qmax"]))))
    return ctx.emit(R.astype(t, str(at["dtype"])))


def _qlinear_softmax(ctx, node):
    x, table = ctx.get(node.inputs[0]), ctx.get(node.inputs[1])
    shape = [int(d) for d in x.ty.shape]
    rows = math.prod(shape[:-1])
    params = (rows, shape[-1], float(node.attrs["y_multiplier"]), int(node.attrs["y_zero_point"]))
    y = ctx.call_kernel("qlinear_softmax_kernel", params, [ctx.emit(R.reshape(x, (rows, shape[-1]))), table],
                        (rows, shape[-1]), "uint8", builders=qoperator_kernels)
    return ctx.emit(R.reshape(y, shape))


QOPERATOR_LOWERINGS = {
    "ConvInteger": (_conv_integer, frozenset({"strides", "pads", "dilations", "group"})),
    "QLinearAdd": (_qlinear_add, frozenset({"a_ratio", "b_ratio", "fixed", "qmin", "qmax", "dtype"})),
    "QLinearMul": (_qlinear_mul, frozenset({"a_zero_point", "b_zero_point", "ratio", "c_zero_point", "qmin", "qmax",
                                            "dtype"})),
    "QLinearAveragePool": (_qlinear_average_pool, frozenset({
        "x_scale", "x_zero_point", "y_scale", "y_zero_point", "kernel_shape", "strides", "pads", "count_include_pad",
        "qmin", "qmax", "dtype"})),
    "QLinearSoftmax": (_qlinear_softmax, frozenset({"y_multiplier", "y_zero_point"})),
}
