"""ONNX -> IR converters for neural-network ops: matmul/Gemm, normalisation, reductions, conv, pooling.

Rewrites (each refuses with :class:`UnsupportedOpError` outside the stated case):

1. Gemm with constant B -> [Transpose(A)] + Linear(weight = alpha * B'[K, N], bias = beta * C
   when C broadcasts to [N]; otherwise an extra Add). Non-constant B -> MatMul (+Mul, +Add).
2. BatchNormalization (inference) -> Mul + Add with folded per-channel constants.
3. Softmax before opset 13 (coerce to 2-D) -> Reshape + Softmax(axis=1) + Reshape unless
   the axis is already the last one.
4. Reduce* with axes as attribute or input -> explicit non-negative ``axes``; empty axes
   mean all axes (or Identity with ``noop_with_empty_axes``).
5. Conv / pools: ``auto_pad`` turned into explicit pads; pools refuse dilations, a
   ``ceil_mode`` that changes the output size, and ``count_include_pad`` with padding.
6. GlobalMaxPool -> ReduceMax over the spatial axes.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedOpError
from .onnx_ops import check_only_first_output, inp, need_const, norm_axis, reshape_to

__all__ = ["NN_CONVERTERS"]


def _matmul(ctx, node, attrs):
    ctx.emit("MatMul", [inp(ctx, node, 0), inp(ctx, node, 1)], {}, [node.output[0]])


def _transpose2d(ctx, name):
    return ctx.emit("Transpose", [name], {"perm": (1, 0)})[0]


def _gemm(ctx, node, attrs):
    a, b, c = inp(ctx, node, 0), inp(ctx, node, 1), inp(ctx, node, 2)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if attrs.get("transA", 0):
        a = _transpose2d(ctx, a)
    out = node.output[0]
    b_const, c_const = ctx.const(b), ctx.const(c) if c else None
    if b_const is not None:
        weight = b_const.T if attrs.get("transB", 0) else b_const
        weight = ctx.new_const(f"{ctx.current}_weight", (weight * np.float32(alpha)).astype(b_const.dtype))
        n = ctx.type_of(weight).shape[1]
        bias = _bias_vector(c_const, beta, n) if c else None
        if c and bias is None:
            y = ctx.emit("Linear", [a, weight], {})[0]
            return _add_scaled(ctx, y, c, beta, out)
        ctx.emit("Linear", [a, weight] + ([ctx.new_const(f"{ctx.current}_bias", bias)] if c else []), {}, [out])
        return
    if attrs.get("transB", 0):
        b = _transpose2d(ctx, b)
    y = ctx.emit("MatMul", [a, b], {}, ["" if (c or alpha != 1.0) else out])[0]
    if alpha != 1.0:
        scale = ctx.new_const(f"{ctx.current}_alpha", np.asarray(alpha, dtype=ctx.type_of(y).dtype))
        y = ctx.emit("Mul", [y, scale], {}, ["" if c else out])[0]
    if c:
        _add_scaled(ctx, y, c, beta, out)


def _bias_vector(c: np.ndarray | None, beta: float, n: int) -> np.ndarray | None:
    if c is None:
        return None
    c2 = c.reshape(c.shape[1:]) if c.ndim == 2 and c.shape[0] == 1 else c
    if c2.ndim > 1 or c2.size not in (1, n):
        return None
    return np.broadcast_to(c2.reshape(-1) * np.float32(beta), (n,)).astype(c.dtype)


def _add_scaled(ctx, y, c, beta, out):
    if beta != 1.0:
        c = ctx.emit("Mul", [c, ctx.new_const(f"{ctx.current}_beta", np.asarray(beta, dtype=ctx.type_of(c).dtype))])[0]
    return ctx.emit("Add", [y, c], {}, [out])[0]


def _batch_norm(ctx, node, attrs):
    if attrs.get("training_mode", 0):
        raise UnsupportedOpError(node.op_type, ctx.current, "training_mode=1")
    check_only_first_output(ctx, node)
    x = inp(ctx, node, 0)
    scale, bias, mean, var = (need_const(ctx, node, i, what) for i, what in enumerate(["scale", "B", "mean", "var"], 1))
    eps = np.float32(attrs.get("epsilon", 1e-5))
    mul = (scale / np.sqrt(var + eps)).astype(np.float32)
    add = (bias - mean * mul).astype(np.float32)
    rank = len(ctx.type_of(x).shape)
    bshape = (-1,) + (1,) * (rank - 2)
    y = ctx.emit("Mul", [x, ctx.new_const(f"{ctx.current}_scale", mul.reshape(bshape))])[0]
    ctx.emit("Add", [y, ctx.new_const(f"{ctx.current}_shift", add.reshape(bshape))], {}, [node.output[0]])


def _softmax(ctx, node, attrs):
    x = inp(ctx, node, 0)
    shape = ctx.type_of(x).shape
    axis = norm_axis(ctx, node, attrs.get("axis", 1 if ctx.opset < 13 else -1), len(shape))
    if ctx.opset >= 13 or axis == len(shape) - 1:
        ctx.emit("Softmax", [x], {"axis": axis}, [node.output[0]])
        return
    flat = reshape_to(ctx, x, (math.prod(shape[:axis]), math.prod(shape[axis:])))
    y = ctx.emit("Softmax", [flat], {"axis": 1})[0]
    reshape_to(ctx, y, shape, node.output[0])


def _layer_norm(ctx, node, attrs):
    check_only_first_output(ctx, node)
    x = inp(ctx, node, 0)
    axis = norm_axis(ctx, node, attrs.get("axis", -1), len(ctx.type_of(x).shape))
    inputs = [x, inp(ctx, node, 1)] + ([inp(ctx, node, 2)] if inp(ctx, node, 2) else [])
    ctx.emit("LayerNorm", inputs, {"axis": axis, "epsilon": float(attrs.get("epsilon", 1e-5))}, [node.output[0]])


def _reduce(ctx, node, attrs):
    x = inp(ctx, node, 0)
    rank = len(ctx.type_of(x).shape)
    axes_in_input = ctx.opset >= 18 or (node.op_type == "ReduceSum" and ctx.opset >= 13)
    if axes_in_input:
        axes = need_const(ctx, node, 1, "axes")
        axes = [] if axes is None else [int(a) for a in np.atleast_1d(axes)]
    else:
        axes = list(attrs.get("axes", []))
    if not axes and attrs.get("noop_with_empty_axes", 0):
        ctx.alias(node.output[0], x)
        return
    axes = tuple(sorted({norm_axis(ctx, node, a, rank) for a in axes})) if axes else tuple(range(rank))
    ctx.emit(node.op_type, [x], {"axes": axes, "keepdims": bool(attrs.get("keepdims", 1))}, [node.output[0]])


def _explicit_pads(ctx, node, attrs, spatial, kernel, strides, dilations):
    auto_pad = attrs.get("auto_pad", "NOTSET")
    r = len(spatial)
    if auto_pad in ("NOTSET", ""):
        return tuple(attrs.get("pads", (0,) * 2 * r))
    if auto_pad == "VALID":
        return (0,) * 2 * r
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise UnsupportedOpError(node.op_type, ctx.current, f"auto_pad={auto_pad}")
    begin, end = [], []
    for d, k, s, dl in zip(spatial, kernel, strides, dilations):
        total = max(0, (-(-d // s) - 1) * s + (k - 1) * dl + 1 - d)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return tuple(begin + end)


def conv_geometry(ctx, node, attrs, x: str, w: str) -> tuple[tuple, tuple, tuple]:
    """(strides, explicit pads, dilations) of a Conv-like ONNX node (auto_pad resolved)."""
    xs, ws = ctx.type_of(x).shape, ctx.type_of(w).shape
    r = len(xs) - 2
    kernel = tuple(attrs.get("kernel_shape", ws[2:]))
    strides = tuple(attrs.get("strides", (1,) * r))
    dilations = tuple(attrs.get("dilations", (1,) * r))
    return strides, _explicit_pads(ctx, node, attrs, xs[2:], kernel, strides, dilations), dilations


def _conv(ctx, node, attrs):
    x, w = inp(ctx, node, 0), inp(ctx, node, 1)
    strides, pads, dilations = conv_geometry(ctx, node, attrs, x, w)
    inputs = [x, w] + ([inp(ctx, node, 2)] if inp(ctx, node, 2) else [])
    out_attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": int(attrs.get("group", 1))}
    ctx.emit("Conv", inputs, out_attrs, [node.output[0]])


def _pool(ctx, node, attrs):
    check_only_first_output(ctx, node)
    x = inp(ctx, node, 0)
    xs = ctx.type_of(x).shape
    r = len(xs) - 2
    kernel = tuple(attrs["kernel_shape"])
    strides = tuple(attrs.get("strides", (1,) * r))
    if any(d != 1 for d in attrs.get("dilations", ())):
        raise UnsupportedOpError(node.op_type, ctx.current, "dilations other than 1")
    pads = _explicit_pads(ctx, node, attrs, xs[2:], kernel, strides, (1,) * r)
    if attrs.get("ceil_mode", 0):
        for i, (d, k, s) in enumerate(zip(xs[2:], kernel, strides)):
            span = d + pads[i] + pads[i + r] - k
            if span % s:
                raise UnsupportedOpError(node.op_type, ctx.current, "ceil_mode=1 changes the output size")
    if node.op_type == "AveragePool" and attrs.get("count_include_pad", 0) and any(pads):
        raise UnsupportedOpError(node.op_type, ctx.current, "count_include_pad=1 with padding")
    ctx.emit(node.op_type, [x], {"kernel_shape": kernel, "strides": strides, "pads": pads}, [node.output[0]])


def _global_avg_pool(ctx, node, attrs):
    ctx.emit("GlobalAveragePool", [inp(ctx, node, 0)], {}, [node.output[0]])


def _global_max_pool(ctx, node, attrs):
    x = inp(ctx, node, 0)
    axes = tuple(range(2, len(ctx.type_of(x).shape)))
    ctx.emit("ReduceMax", [x], {"axes": axes, "keepdims": True}, [node.output[0]])


NN_CONVERTERS = {
    "MatMul": _matmul, "Gemm": _gemm, "BatchNormalization": _batch_norm,
    "Softmax": _softmax, "LayerNormalization": _layer_norm,
    **{op: _reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2")},
    "Conv": _conv, "MaxPool": _pool, "AveragePool": _pool,
    "GlobalAveragePool": _global_avg_pool, "GlobalMaxPool": _global_max_pool,
}
