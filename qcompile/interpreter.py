"""Reference interpreter: executes the IR in numpy, one kernel per op of :mod:`qcompile.ops`.

It is the semantic ground truth the backends and passes are checked against, so kernels
favour clarity over speed. Invariants: float math stays float32 (erf goes through scipy
and is cast back); every kernel output is checked against the declared :class:`TensorType`
of its value (a mismatch is an :class:`InvariantError`, i.e. a bug in a frontend, pass or
kernel); feeds are validated against the graph inputs (:class:`InputError`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.special

from .errors import InputError, InvariantError, UnsupportedOpError
from .ir import Graph, Node
from . import mlas_float
from .interpreter_qoperator import QOPERATOR_KERNELS
from .interpreter_quant import QUANT_KERNELS
from .interpreter_int8 import INT8_KERNELS
from .interpreter_integer import INTEGER_KERNELS
from .interpreter_integer_nn import INTEGER_NN_KERNELS
from .quant import dequantize_weight

__all__ = ["run", "run_node", "KERNELS", "dequantize_qgather_table", "dequantize_qlinear_weight"]

Kernel = Callable[[Graph, Node, list], np.ndarray]


def run(graph: Graph, feeds: dict[str, np.ndarray], keep_all: bool = False) -> dict[str, np.ndarray]:
    """Run ``graph`` on ``feeds``; return its outputs (or every value when ``keep_all``)."""
    env: dict[str, np.ndarray] = dict(graph.constants)
    env.update(_validated_feeds(graph, feeds))
    for node in graph.nodes:
        args = [env[name] if name else None for name in node.inputs]
        for name, array in zip(node.outputs, run_node(graph, node, args)):
            env[name] = array
    if keep_all:
        return env
    return {name: env[name] for name in graph.outputs}


def run_node(graph: Graph, node: Node, args: list) -> list[np.ndarray]:
    """Execute one node on concrete arrays; outputs are checked against their declared types."""
    kernel = KERNELS.get(node.op)
    if kernel is None:
        raise UnsupportedOpError(node.op, node.name, "the reference interpreter has no kernel")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # IEEE results, as ONNX
        outs = kernel(graph, node, args)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    for name, array in zip(node.outputs, outs):
        want = graph.values[name].type if name in graph.values else None
        if want is not None and (array.shape != want.shape or str(array.dtype) != want.dtype):
            raise InvariantError(
                f"node '{node.name}' ({node.op}) produced {array.dtype}{list(array.shape)} for '{name}', declared {want}"
            )
    return outs


def _validated_feeds(graph: Graph, feeds: dict) -> dict[str, np.ndarray]:
    missing = [n for n in graph.inputs if n not in feeds]
    if missing:
        raise InputError(f"missing input(s) {', '.join(repr(m) for m in missing)}; the graph takes {graph.inputs}")
    out = {}
    for name in graph.inputs:
        t = graph.type_of(name)
        array = np.asarray(feeds[name])
        if array.shape != t.shape:
            raise InputError(f"input '{name}' has shape {array.shape}, expected {t.shape}")
        if str(array.dtype) != t.dtype:
            raise InputError(f"input '{name}' has dtype {array.dtype}, expected {t.dtype}")
        out[name] = array
    return out


# ---------------------------------------------------------------------------- elementwise
def _int_div(a, b):
    """ONNX integer Div truncates toward zero (C semantics), unlike numpy's floor division."""
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))


def _div(a, b):
    return _int_div(a, b) if np.issubdtype(a.dtype, np.integer) else np.divide(a, b)


def _pow(a, b):
    if np.issubdtype(a.dtype, np.floating):
        return np.power(a, b.astype(a.dtype))
    return np.power(a, b).astype(a.dtype)


def _erf(x):
    if x.dtype == np.float32:
        return mlas_float.erf(x)
    return scipy.special.erf(x).astype(x.dtype)


def _binary(fn):
    return lambda g, n, a: np.asarray(fn(a[0], a[1]))


def _unary(fn):
    return lambda g, n, a: np.asarray(fn(a[0]))


_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _div, "Pow": _pow,
    "Max": np.maximum, "Min": np.minimum, "Equal": np.equal, "Less": np.less, "Greater": np.greater,
    "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal,
    "And": np.logical_and, "Or": np.logical_or,
}
_UNARY = {
    "Sqrt": np.sqrt, "Erf": _erf, "Tanh": np.tanh, "Relu": lambda x: np.maximum(x, x.dtype.type(0)),
    "Sigmoid": lambda x: (1 / (1 + np.exp(-x))).astype(x.dtype), "Exp": np.exp, "Log": np.log,
    "Neg": np.negative, "Abs": np.abs, "Not": np.logical_not,
    "Reciprocal": lambda x: (1 / x).astype(x.dtype), "IsNaN": np.isnan, "Identity": np.copy,
}


def _where(g, n, a):
    return np.where(a[0], a[1], a[2])


def _clip(g, n, a):
    x, lo, hi = a[0], n.attrs.get("min"), n.attrs.get("max")
    if lo is not None:
        x = np.maximum(x, np.asarray(lo).astype(x.dtype))
    if hi is not None:
        x = np.minimum(x, np.asarray(hi).astype(x.dtype))
    return x


def _gelu(g, n, a):
    x = a[0]
    if n.attrs.get("approximate", "none") == "tanh":
        inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x**3)
        return (np.float32(0.5) * x * (1 + np.tanh(inner))).astype(x.dtype)
    return (np.float32(0.5) * x * (1 + _erf(x / np.float32(np.sqrt(2))))).astype(x.dtype)


def _hadamard(g, n, a):
    from .hadamard import hadamard_transform

    if n.attrs.get("axis", -1) not in (-1, a[0].ndim - 1):
        raise UnsupportedOpError(n.op, n.name, "Hadamard is defined on the last axis only")
    return hadamard_transform(a[0], int(n.attrs["size"]))


def _cast(g, n, a):
    return a[0].astype(n.attrs["to"])


# ---------------------------------------------------------------------------- normalisation
def _softmax(g, n, a):
    return mlas_float.softmax(a[0], n.attrs["axis"]).astype(a[0].dtype)


def _layer_norm(g, n, a):
    x, scale, bias = a[0], a[1], a[2] if len(a) > 2 else None
    return mlas_float.layer_norm(x, scale, bias, n.attrs.get("epsilon", 1e-5), n.attrs["axis"]).astype(x.dtype)


def _reduce(fn):
    def kernel(g, n, a):
        return np.asarray(fn(a[0], axis=tuple(n.attrs["axes"]), keepdims=bool(n.attrs["keepdims"]))).astype(a[0].dtype)

    return kernel


def _reduce_l2(x, axis, keepdims):
    return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims))


# ---------------------------------------------------------------------------- linear algebra
def _matmul(g, n, a):
    # contiguous operands keep numpy on its BLAS path (strided views fall back to slow loops)
    return np.matmul(np.ascontiguousarray(a[0]), np.ascontiguousarray(a[1]))


def _rows_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x[..., K] @ w[K, N] as one 2-D BLAS call."""
    y = np.ascontiguousarray(x).reshape(-1, x.shape[-1]) @ np.ascontiguousarray(w)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def _linear(g, n, a):
    y = _rows_matmul(a[0], a[1])
    return y + a[2] if len(a) > 2 and a[2] is not None else y


def dequantize_qlinear_weight(graph: Graph, node: Node, args: list) -> np.ndarray:
    """Float32 W[K, N] of a QLinear node (args: x, qweight, scales, zeros?, bias?)."""
    k = graph.values[node.inputs[1]].quant.logical_shape[0]
    zeros = args[3] if len(args) > 3 else None
    return dequantize_weight(args[1], args[2], zeros, node.attrs["bits"], node.attrs["group_size"], k)


def _qlinear(g, n, a):
    y = _rows_matmul(a[0], dequantize_qlinear_weight(g, n, a))
    return (y + a[4] if len(a) > 4 and a[4] is not None else y).astype(a[0].dtype)


def dequantize_qgather_table(graph: Graph, node: Node, args: list) -> np.ndarray:
    """Float32 table[V, D] of a QGather node (args: qtable, scales, zeros?, indices).

    Packing: uint8 [V, ceil(D*bits/8)] and scales/zeros [V, G]: :func:`qcompile.quant.pack_codes`
    with rows = V and the packed (grouped) axis = D.
    """
    d = graph.values[node.inputs[0]].quant.logical_shape[1]
    zeros = args[2] if len(args) > 3 else None
    return dequantize_weight(args[0], args[1], zeros, node.attrs["bits"], node.attrs["group_size"], d).T


def _qgather(g, n, a):
    return np.take(dequantize_qgather_table(g, n, a), a[-1], axis=0)


# ---------------------------------------------------------------------------- data movement
def _reshape(g, n, a):
    return a[0].reshape(n.attrs["shape"])


def _transpose(g, n, a):
    return np.transpose(a[0], n.attrs["perm"])


def _gather(g, n, a):
    axis = n.attrs["axis"]
    idx = a[1].astype(np.int64)
    idx = np.where(idx < 0, idx + a[0].shape[axis], idx)
    return np.take(a[0], idx, axis=axis)


def _slice(g, n, a):
    index = [slice(None)] * a[0].ndim
    at = n.attrs
    for start, end, axis, step in zip(at["starts"], at["ends"], at["axes"], at["steps"]):
        index[axis] = slice(start, None if end < 0 else end, step)
    return np.ascontiguousarray(a[0][tuple(index)])


def _concat(g, n, a):
    return np.concatenate(a, axis=n.attrs["axis"])


def _expand(g, n, a):
    return np.ascontiguousarray(np.broadcast_to(a[0], np.broadcast_shapes(a[0].shape, tuple(n.attrs["shape"]))))


# ---------------------------------------------------------------------------- convolution
def _windows(x, kernel, strides, dilations):
    """View x[N, C, *S] as [N, C, *out, *kernel] windows."""
    spatial = tuple(range(2, x.ndim))
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=spatial)
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, d) for d in dilations)
    return win[index]


def _pad(x, pads, value):
    r = x.ndim - 2
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + r]) for i in range(r)]
    return np.pad(x, width, constant_values=value)


def _conv(g, n, a):
    x, w, b = a[0], a[1], a[2] if len(a) > 2 else None
    r = x.ndim - 2
    at = n.attrs
    xp = _pad(x, at.get("pads") or (0,) * 2 * r, 0)
    win = _windows(xp, w.shape[2:], at.get("strides") or (1,) * r, at.get("dilations") or (1,) * r)
    groups = at.get("group", 1)
    cin, cout = w.shape[1], w.shape[0] // groups
    outs = []
    for gi in range(groups):
        xg = win[:, gi * cin : (gi + 1) * cin]
        wg = w[gi * cout : (gi + 1) * cout]
        outs.append(np.tensordot(xg, wg, axes=([1] + list(range(2 + r, 2 + 2 * r)), [1] + list(range(2, 2 + r)))))
    y = np.moveaxis(np.concatenate(outs, axis=-1), -1, 1)
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * r)
    return np.ascontiguousarray(y.astype(x.dtype))


def _pool(kind):
    def kernel(g, n, a):
        x, at = a[0], n.attrs
        r = x.ndim - 2
        kshape, pads = tuple(at["kernel_shape"]), at.get("pads") or (0,) * 2 * r
        strides = at.get("strides") or (1,) * r
        axes = tuple(range(-r, 0))
        if kind == "max":
            low = -np.inf if np.issubdtype(x.dtype, np.floating) else np.iinfo(x.dtype).min  # integer-only pools
            win = _windows(_pad(x, pads, low), kshape, strides, (1,) * r)
            return np.ascontiguousarray(win.max(axis=axes))
        total = _windows(_pad(x, pads, 0), kshape, strides, (1,) * r).sum(axis=axes)
        count = _windows(_pad(np.ones_like(x[:1, :1]), pads, 0), kshape, strides, (1,) * r).sum(axis=axes)
        return np.ascontiguousarray((total / count).astype(x.dtype))

    return kernel


def _global_avg_pool(g, n, a):
    return np.mean(a[0], axis=tuple(range(2, a[0].ndim)), keepdims=True).astype(a[0].dtype)


KERNELS: dict[str, Kernel] = {
    **{op: _binary(fn) for op, fn in _BINARY.items()},
    **{op: _unary(fn) for op, fn in _UNARY.items()},
    "Where": _where, "Clip": _clip, "Gelu": _gelu, "Cast": _cast,
    "Hadamard": _hadamard,
    "Softmax": _softmax, "LayerNorm": _layer_norm,
    "ReduceMean": _reduce(np.mean), "ReduceSum": _reduce(np.sum), "ReduceMax": _reduce(np.max),
    "ReduceMin": _reduce(np.min), "ReduceL2": _reduce(_reduce_l2),
    "MatMul": _matmul, "Linear": _linear, "QLinear": _qlinear, "QGather": _qgather,
    "Reshape": _reshape, "Transpose": _transpose, "Gather": _gather, "Slice": _slice,
    "Concat": _concat, "Expand": _expand,
    "Conv": _conv, "MaxPool": _pool("max"), "AveragePool": _pool("avg"), "GlobalAveragePool": _global_avg_pool,
    **QUANT_KERNELS,
    **QOPERATOR_KERNELS,
    **INT8_KERNELS,
    **INTEGER_KERNELS,
    **INTEGER_NN_KERNELS,
}
