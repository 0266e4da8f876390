"""Static type rules of the QOperator ops (merged into :mod:`.shape_inference`'s rule table).

ConvInteger -> int32 with Conv's output shape; QLinearAdd / QLinearMul -> ``attrs["dtype"]`` with the
broadcast shape of its two inputs; QLinearAveragePool -> ``attrs["dtype"]`` with AveragePool's shape;
QLinearSoftmax -> uint8 with its input's shape.
"""

from __future__ import annotations

from ..ir import TensorType

__all__ = ["QOPERATOR_RULES"]


def _conv_integer(graph, node, ins):
    from .shape_inference import _conv

    return TensorType(_conv(graph, node, ins[:2]).shape, "int32")


def _qlinear_add(graph, node, ins):
    from .shape_inference import broadcast_shapes

    return TensorType(broadcast_shapes(node, ins[0].shape, ins[1].shape), node.attrs["dtype"])


def _qlinear_average_pool(graph, node, ins):
    from .shape_inference import _pool

    return TensorType(_pool(graph, node, ins).shape, node.attrs["dtype"])


def _qlinear_softmax(graph, node, ins):
    return TensorType(ins[0].shape, "uint8")


QOPERATOR_RULES = {"ConvInteger": _conv_integer, "QLinearAdd": _qlinear_add, "QLinearMul": _qlinear_add,
                   "QLinearAveragePool": _qlinear_average_pool, "QLinearSoftmax": _qlinear_softmax}
