"""Static type rules of the quantization ops (merged into :mod:`.shape_inference`'s rule table).

QuantizeLinear -> ``attrs["dtype"]`` with the input's shape; DequantizeLinear -> float32 with
the input's shape (scale/zero point must broadcast to it); DynamicQuantizeLinear -> (uint8
like x, float32 [], uint8 []); MatMulInteger -> int32 with numpy matmul shape rules.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..ir import TensorType

__all__ = ["QUANT_RULES", "QUANT_MULTI_RULES"]


def _check_broadcast(node, ins):
    x = ins[0].shape
    for t in ins[1:3]:
        if t is not None and tuple(np.broadcast_shapes(x, t.shape)) != tuple(x):
            raise ShapeError(f"node '{node.name}' ({node.op}): parameter shape {t.shape} does not broadcast to {x}")


def _quantize(graph, node, ins):
    _check_broadcast(node, ins)
    return TensorType(ins[0].shape, node.attrs["dtype"])


def _dequantize(graph, node, ins):
    _check_broadcast(node, ins)
    return TensorType(ins[0].shape, "float32")


def _matmul_integer(graph, node, ins):
    a, b = ins[0].shape, ins[1].shape
    if a[-1] != b[-2 if len(b) > 1 else 0]:
        raise ShapeError(f"node '{node.name}' (MatMulInteger): inner dimensions differ, {a} @ {b}")
    batch = tuple(np.broadcast_shapes(a[:-2], b[:-2]))
    return TensorType(batch + a[-2:-1] + b[-1:] if len(b) > 1 else a[:-1], "int32")


def _dynamic(graph, node, ins):
    return [TensorType(ins[0].shape, "uint8"), TensorType((), "float32"), TensorType((), "uint8")]


QUANT_RULES = {"QuantizeLinear": _quantize, "DequantizeLinear": _dequantize, "MatMulInteger": _matmul_integer}
QUANT_MULTI_RULES = {"DynamicQuantizeLinear": _dynamic}
