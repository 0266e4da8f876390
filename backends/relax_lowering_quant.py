"""Relax lowerings of the quantization ops (merged into :mod:`.relax_lowering`'s rule table).

Numerics match :mod:`qcompile.interpreter_quant` bit for bit: ``relax.op.round`` lowers to
``nearbyint`` (round half to even under the default FP environment), the quotient is a true
float32 division (never a multiplication by a reciprocal), saturation is a clip in float32
before the cast (every int8/uint8/int16 value is exact in float32). MatMulInteger
accumulates in int32 (``relax.op.matmul(..., out_dtype="int32")``; two run-time operands with
equal batch dimensions: the opaque kernel of :mod:`.qoperator_kernels`).
"""

from __future__ import annotations

import math

from tvm import relax, te

from . import qoperator_kernels

__all__ = ["QUANT_LOWERINGS"]

R = relax.op
_OPAQUE = 8  # relax OpPatternKind::kOpaque: FuseOps never fuses the call


def _f32(ctx, x):
    return x if str(x.ty.dtype) == "float32" else ctx.emit(R.astype(x, "float32"))


def _quantize(ctx, x, scale, zp, qmin, qmax, dtype):
    q = ctx.emit(R.round(ctx.emit(R.divide(x, scale))))
    q = ctx.emit(R.add(q, _f32(ctx, zp)))
    q = ctx.emit(R.where(ctx.emit(R.isnan(q)), relax.const(float(qmin), "float32"), q))  # NaN -> qmin, as ORT
    return ctx.emit(R.astype(_clamp(ctx, q, qmin, qmax), dtype))


def _clamp(ctx, x, lo: float, hi: float):
    x = ctx.emit(R.maximum(x, relax.const(float(lo), "float32")))
    return ctx.emit(R.minimum(x, relax.const(float(hi), "float32")))


def _quantize_linear(ctx, node):
    x, scale, zp = (ctx.get(n) for n in node.inputs)
    a = node.attrs
    return _quantize(ctx, x, scale, zp, int(a["qmin"]), int(a["qmax"]), str(a["dtype"]))


def _dequantize_linear(ctx, node):
    """An opaque kernel of its own: a consumer fused with it could contract its multiply with
    an add into an FMA (TVM's LLVM code generator allows FP contraction), and values on the
    quantization grid sit exactly on rounding ties of the next QuantizeLinear."""
    x, scale, zp = (ctx.get(n) for n in node.inputs)
    shapes = tuple(tuple(int(d) for d in v.ty.shape) for v in (x, scale, zp))
    dtypes = tuple(str(v.ty.dtype) for v in (x, scale, zp))
    key = ("dequantize_linear", shapes, dtypes)
    gvar = ctx._kernels.get(key)
    if gvar is None:
        func = _dequantize_func(shapes, dtypes).with_attr("op_pattern", _OPAQUE)
        gvar = ctx.bb.add_func(func, f"dequantize_linear_{len(ctx._kernels)}")
        ctx._kernels[key] = gvar
    return ctx.emit(relax.call_tir(gvar, [x, scale, zp], relax.TensorType(shapes[0], "float32")))


def _dequantize_func(shapes, dtypes):
    """TE: y[i] = (float(x[i]) - float(zp[b(i)])) * scale[b(i)], b = broadcast of the index."""
    x = te.placeholder(shapes[0], dtypes[0], name="x")
    s = te.placeholder(shapes[1], dtypes[1], name="scale")
    z = te.placeholder(shapes[2], dtypes[2], name="zero_point")
    rank = len(shapes[0])

    def at(t, idx):
        off = rank - len(t.shape)
        return t[tuple(0 if int(t.shape[i]) == 1 else idx[off + i] for i in range(len(t.shape)))]

    y = te.compute(shapes[0], lambda *i: (x[i].astype("float32") - at(z, i).astype("float32")) * at(s, i), name="dequantize")
    func = te.create_prim_func([x, s, z, y])
    return func.without_attr("global_symbol") if func.attrs is not None and "global_symbol" in func.attrs else func


def _dynamic_quantize_linear(ctx, node):
    x = ctx.get(node.inputs[0])
    zero = relax.const(0.0, "float32")
    lo = ctx.emit(R.minimum(ctx.emit(R.min(x)), zero))
    hi = ctx.emit(R.maximum(ctx.emit(R.max(x)), zero))
    scale = ctx.emit(R.divide(ctx.emit(R.subtract(hi, lo)), relax.const(255.0, "float32")))
    one = relax.const(1.0, "float32")
    scale = ctx.emit(R.where(ctx.emit(R.equal(scale, zero)), one, scale))
    zp_f = ctx.emit(R.round(ctx.emit(R.subtract(zero, ctx.emit(R.divide(lo, scale))))))
    zp = ctx.emit(R.astype(_clamp(ctx, zp_f, 0, 255), "uint8"))
    y = _quantize(ctx, x, scale, zp, 0, 255, "uint8")
    return [y, scale, zp]


def _i32(ctx, x, zp_name):
    x = ctx.emit(R.astype(x, "int32"))
    if not zp_name:
        return x
    zp = ctx.emit(R.astype(ctx.get(zp_name), "int32"))
    return ctx.emit(R.subtract(x, zp))


def _matmul_integer(ctx, node):
    from .matmul_integer_gemm import lower_matmul_integer_gemm  # constant B: scheduled int8 GEMM

    scheduled = lower_matmul_integer_gemm(ctx, node)
    if scheduled is not None:
        return scheduled
    ins = list(node.inputs) + [""] * (4 - len(node.inputs))
    a = _i32(ctx, ctx.get(ins[0]), ins[2])
    b = _i32(ctx, ctx.get(ins[1]), ins[3])
    a_shape, b_shape = ([int(d) for d in v.ty.shape] for v in (a, b))
    if len(a_shape) > 2 and a_shape[:-2] == b_shape[:-2]:  # run-time batched product: a kernel of its own
        batch, (m, k), n = math.prod(a_shape[:-2]), a_shape[-2:], b_shape[-1]
        c = ctx.call_kernel("batch_matmul_int32_kernel", (batch, m, k, n),
                            [ctx.emit(R.reshape(a, (batch, m, k))), ctx.emit(R.reshape(b, (batch, k, n)))],
                            (batch, m, n), "int32", builders=qoperator_kernels)
        return ctx.emit(R.reshape(c, a_shape[:-1] + [n]))
    return ctx.emit(R.matmul(a, b, out_dtype="int32"))


QUANT_LOWERINGS = {
    "QuantizeLinear": (_quantize_linear, frozenset({"qmin", "qmax", "dtype"})),
    "DequantizeLinear": (_dequantize_linear, frozenset()),
    "DynamicQuantizeLinear": (_dynamic_quantize_linear, frozenset()),
    "MatMulInteger": (_matmul_integer, frozenset()),
}
