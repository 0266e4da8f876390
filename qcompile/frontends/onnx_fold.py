"""Import-time evaluation of ONNX ops that never reach the IR.

1. Constant -> a pending constant.
2. Shape / Size of any value (static shapes are known) -> constants.
3. ConstantOfShape, Range with constant inputs -> constants.
4. Any other ONNX op without a converter whose inputs are all constants is evaluated by
   ``onnx.reference`` (e.g. Mod, Tile, NonZero on shape tensors).

Shape-only ops with a run-time input refuse with :class:`UnsupportedOpError`.
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..errors import UnsupportedOpError
from .onnx_ops import inp, need_const

__all__ = ["FOLDERS", "fold_with_reference"]


def _constant(ctx, node, attrs):
    if "value" in attrs:
        array = numpy_helper.to_array(attrs["value"])
    elif "value_float" in attrs:
        array = np.asarray(attrs["value_float"], dtype=np.float32)
    elif "value_floats" in attrs:
        array = np.asarray(attrs["value_floats"], dtype=np.float32)
    elif "value_int" in attrs:
        array = np.asarray(attrs["value_int"], dtype=np.int64)
    elif "value_ints" in attrs:
        array = np.asarray(attrs["value_ints"], dtype=np.int64)
    else:
        raise UnsupportedOpError(node.op_type, ctx.current, f"attribute {sorted(attrs)}")
    ctx.set_const(node.output[0], array)


def _shape(ctx, node, attrs):
    shape = ctx.type_of(inp(ctx, node, 0)).shape
    rank = len(shape)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
    ctx.set_const(node.output[0], np.asarray(shape[start:end], dtype=np.int64))


def _size(ctx, node, attrs):
    ctx.set_const(node.output[0], np.asarray(ctx.type_of(inp(ctx, node, 0)).size, dtype=np.int64))


def _constant_of_shape(ctx, node, attrs):
    shape = need_const(ctx, node, 0, "shape")
    value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, dtype=np.float32)
    ctx.set_const(node.output[0], np.full(tuple(int(d) for d in shape), value.reshape(-1)[0], dtype=value.dtype))


def _range(ctx, node, attrs):
    start, limit, delta = (need_const(ctx, node, i, what) for i, what in enumerate(["start", "limit", "delta"]))
    ctx.set_const(node.output[0], np.arange(start, limit, delta).astype(start.dtype))


def fold_with_reference(ctx, node) -> None:
    """Evaluate ``node`` (all inputs constant) with onnx.reference; bind its outputs as constants."""
    from onnx.reference import ReferenceEvaluator

    feeds = {name: ctx.const(ctx.ir(name)) for name in node.input if name}
    try:
        evaluator = ReferenceEvaluator(node, opsets={"": ctx.opset, node.domain: 1} if node.domain else {"": ctx.opset})
        results = evaluator.run(None, feeds)
    except Exception as err:  # onnx.reference raises many types for unknown ops / bad inputs
        raise UnsupportedOpError(node.op_type, ctx.current, f"cannot be evaluated at import time ({type(err).__name__})") from None
    for name, array in zip(node.output, results):
        if name:
            ctx.set_const(name, np.asarray(array))


FOLDERS = {
    "Constant": _constant, "Shape": _shape, "Size": _size,
    "ConstantOfShape": _constant_of_shape, "Range": _range,
}
