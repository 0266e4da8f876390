"""Static type inference for IR nodes: ``infer_types(graph, node) -> [TensorType, ...]``.

The frontends build the IR node by node and call this to declare every output value, so
the static shapes are computed by qcompile itself (ONNX's own shape inference is never
trusted). Invariants: the inputs of ``node`` are already declared in ``graph.values``;
attributes are in the normalised form :mod:`qcompile.ops` describes (non-negative axes,
resolved shapes). A shape mismatch raises :class:`ShapeError` naming the node; operands
that ONNX requires to share a dtype but do not raise :class:`ModelFormatError`.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ModelFormatError, ShapeError, UnsupportedOpError
from ..ir import Graph, Node, TensorType
from ..ops import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, REDUCTIONS
from .shape_qoperator import QOPERATOR_RULES
from .shape_quant import QUANT_MULTI_RULES, QUANT_RULES

__all__ = ["infer_types", "broadcast_shapes"]

_BOOL_OUT = frozenset("Equal Less Greater LessOrEqual GreaterOrEqual And Or IsNaN Not".split())
_SAME_AS_FIRST = frozenset("Clip Gelu Softmax LayerNorm Identity".split())
# op -> which inputs must share one dtype (ONNX's type constraint T)
_SAME_DTYPE = {
    **{op: slice(0, 2) for op in ELEMENTWISE_BINARY - {"Pow"}},
    "Where": slice(1, 3), "MatMul": slice(0, 2), "Linear": slice(0, 3), "Conv": slice(0, 3),
    "Concat": slice(0, None), "LayerNorm": slice(0, 3),
}


def broadcast_shapes(node: Node, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError(f"node '{node.name}' ({node.op}): shapes {list(shapes)} do not broadcast") from None


def infer_types(graph: Graph, node: Node) -> list[TensorType]:
    """Output types of ``node`` from its input types and attributes."""
    ins = [graph.type_of(n) if n else None for n in node.inputs]
    op = node.op
    if op in _SAME_DTYPE:
        _check_same_dtype(node, ins[_SAME_DTYPE[op]])
    if op in ELEMENTWISE_BINARY or op == "Where":
        shape = broadcast_shapes(node, *(t.shape for t in ins))
        dtype = "bool" if op in _BOOL_OUT else ins[-1 if op == "Where" else 0].dtype
        return [TensorType(shape, dtype)]
    if op in ELEMENTWISE_UNARY or op in _SAME_AS_FIRST:
        return [TensorType(ins[0].shape, "bool" if op in _BOOL_OUT else ins[0].dtype)]
    if op == "Cast":
        return [TensorType(ins[0].shape, node.attrs["to"])]
    if op in REDUCTIONS:
        axes, keep = set(node.attrs["axes"]), node.attrs["keepdims"]
        shape = tuple(1 if i in axes else d for i, d in enumerate(ins[0].shape) if keep or i not in axes)
        return [TensorType(shape, ins[0].dtype)]
    if op in QUANT_MULTI_RULES:
        return QUANT_MULTI_RULES[op](graph, node, ins)
    rule = _RULES.get(op) or QUANT_RULES.get(op) or QOPERATOR_RULES.get(op)
    if rule is None:
        raise UnsupportedOpError(op, node.name, "no shape rule")
    return [rule(graph, node, ins)]


def _check_same_dtype(node: Node, types) -> None:
    dtypes = sorted({t.dtype for t in types if t is not None})
    if len(dtypes) > 1:
        raise ModelFormatError(f"node '{node.name}' ({node.op}): operand dtypes {' and '.join(dtypes)} differ")


def _matmul(graph, node, ins):
    a, b = ins[0].shape, ins[1].shape
    a2, b2 = (1,) + a if len(a) == 1 else a, b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ShapeError(f"node '{node.name}' (MatMul): inner dimensions differ, {a} @ {b}")
    batch = broadcast_shapes(node, a2[:-2], b2[:-2])
    shape = batch + ((a2[-2],) if len(a) > 1 else ()) + ((b2[-1],) if len(b) > 1 else ())
    return TensorType(shape, ins[0].dtype)


def _linear(graph, node, ins):
    k, n = ins[1].shape
    return _check_k(node, ins[0], k, n)


def _qlinear(graph, node, ins):
    k, n = graph.values[node.inputs[1]].quant.logical_shape
    return _check_k(node, ins[0], k, n)


def _check_k(node, x, k, n):
    if x.shape[-1] != k:
        raise ShapeError(f"node '{node.name}' ({node.op}): input has {x.shape[-1]} features, weight expects {k}")
    return TensorType(x.shape[:-1] + (n,), x.dtype)


def _qgather(graph, node, ins):
    _, d = graph.values[node.inputs[0]].quant.logical_shape
    return TensorType(ins[-1].shape + (d,), ins[1].dtype)


def _reshape(graph, node, ins):
    shape = tuple(node.attrs["shape"])
    if math.prod(shape) != ins[0].size:
        raise ShapeError(f"node '{node.name}' (Reshape): cannot reshape {ins[0].shape} to {shape}")
    return TensorType(shape, ins[0].dtype)


def _transpose(graph, node, ins):
    return TensorType(tuple(ins[0].shape[p] for p in node.attrs["perm"]), ins[0].dtype)


def _gather(graph, node, ins):
    axis, shape = node.attrs["axis"], ins[0].shape
    return TensorType(shape[:axis] + ins[1].shape + shape[axis + 1 :], ins[0].dtype)


def _slice(graph, node, ins):
    shape = list(ins[0].shape)
    a = node.attrs
    for start, end, axis, step in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
        shape[axis] = len(range(start, end, step))  # clamped: end == -1 only for negative steps
    return TensorType(tuple(shape), ins[0].dtype)


def _concat(graph, node, ins):
    axis = node.attrs["axis"]
    first = ins[0].shape
    for t in ins[1:]:
        if len(t.shape) != len(first) or any(d != e for i, (d, e) in enumerate(zip(t.shape, first)) if i != axis):
            raise ShapeError(f"node '{node.name}' (Concat): {t.shape} does not match {first} off axis {axis}")
    return TensorType(first[:axis] + (sum(t.shape[axis] for t in ins),) + first[axis + 1 :], ins[0].dtype)


def _expand(graph, node, ins):
    return TensorType(broadcast_shapes(node, ins[0].shape, tuple(node.attrs["shape"])), ins[0].dtype)


def _window(node, spatial, kernel, attrs):
    strides = attrs.get("strides") or (1,) * len(kernel)
    pads = attrs.get("pads") or (0,) * (2 * len(kernel))
    dil = attrs.get("dilations") or (1,) * len(kernel)
    out = []
    for i, (d, k) in enumerate(zip(spatial, kernel)):
        span = (k - 1) * dil[i] + 1
        size = (d + pads[i] + pads[i + len(kernel)] - span) // strides[i] + 1
        if size <= 0:
            raise ShapeError(f"node '{node.name}' ({node.op}): window {kernel} larger than input {spatial}")
        out.append(size)
    return tuple(out)


def _conv(graph, node, ins):
    x, w = ins[0].shape, ins[1].shape
    if x[1] != w[1] * node.attrs.get("group", 1):
        raise ShapeError(f"node '{node.name}' (Conv): {x[1]} input channels, weight {w} with group {node.attrs.get('group', 1)}")
    return TensorType((x[0], w[0]) + _window(node, x[2:], w[2:], node.attrs), ins[0].dtype)


def _pool(graph, node, ins):
    x = ins[0].shape
    return TensorType(x[:2] + _window(node, x[2:], tuple(node.attrs["kernel_shape"]), node.attrs), ins[0].dtype)


def _global_pool(graph, node, ins):
    x = ins[0].shape
    return TensorType(x[:2] + (1,) * (len(x) - 2), ins[0].dtype)


_RULES = {
    "MatMul": _matmul, "Linear": _linear, "QLinear": _qlinear, "QGather": _qgather,
    "Reshape": _reshape, "Transpose": _transpose, "Gather": _gather, "Slice": _slice,
    "Concat": _concat, "Expand": _expand, "Conv": _conv, "MaxPool": _pool, "AveragePool": _pool,
    "GlobalAveragePool": _global_pool,
}
