"""Per-op ONNX -> IR converters: elementwise, casts, data movement.

Each converter is ``fn(ctx, node, attrs)`` where ``ctx`` is the
:class:`~qcompile.frontends.onnx_frontend.Importer` and ``attrs`` the node's attributes
as Python values. Converters normalise ONNX's tensor-valued shape operands into the static
attributes of :mod:`qcompile.ops` (negative axes made non-negative, Reshape 0/-1
resolved, Slice bounds clamped) and refuse, with :class:`UnsupportedOpError` naming the
node, whatever they cannot express. ``convert_node`` dispatches; neural-network ops live
in :mod:`.onnx_nn`, shape-only ops and the constant-folding fallback in :mod:`.onnx_fold`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from ..errors import ShapeError, UnsupportedOpError

__all__ = [
    "convert_node", "CONVERTERS", "attrs_of", "inp", "need_const", "onnx_dtype_name", "norm_axis", "reshape_to",
    "check_only_first_output", "clamp_slice",
]


# ---------------------------------------------------------------------------- helpers
def attrs_of(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def inp(ctx, node, i: int) -> str:
    """IR name of ONNX input ``i`` ("" when absent)."""
    return ctx.ir(node.input[i]) if i < len(node.input) else ""


def need_const(ctx, node, i: int, what: str) -> np.ndarray | None:
    """Constant value of input ``i`` (None if absent); refuse when it is computed at run time."""
    name = inp(ctx, node, i)
    if not name:
        return None
    array = ctx.const(name)
    if array is None:
        raise UnsupportedOpError(node.op_type, ctx.current, f"{what} (input {i}) must be a constant")
    return array


def onnx_dtype_name(ctx, node, elem_type: int) -> str:
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))
    except Exception:
        raise UnsupportedOpError(node.op_type, ctx.current, f"ONNX element type {elem_type}") from None


def _rank(ctx, name: str) -> int:
    return len(ctx.type_of(name).shape)


def norm_axis(ctx, node, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ShapeError(f"node '{ctx.current}' ({node.op_type}): axis {axis} out of range for rank {rank}")
    return axis % max(rank, 1)


def reshape_to(ctx, name: str, shape, out: str = "") -> str:
    if tuple(int(d) for d in shape) == ctx.type_of(name).shape:
        if out:
            ctx.alias(out, name)
        return name
    return ctx.emit("Reshape", [name], {"shape": tuple(int(d) for d in shape)}, [out])[0]


def check_only_first_output(ctx, node) -> None:
    for extra in node.output[1:]:
        if extra and extra in ctx.consumed:
            raise UnsupportedOpError(node.op_type, ctx.current, f"its optional output '{extra}' is used")


# ---------------------------------------------------------------------------- elementwise
_BINARY = "Add Sub Mul Div Pow Equal Less Greater LessOrEqual GreaterOrEqual And Or".split()
_UNARY = "Sqrt Erf Tanh Relu Sigmoid Exp Log Neg Abs Not Reciprocal IsNaN".split()


def _same(op):
    def convert(ctx, node, attrs):
        ctx.emit(op, [inp(ctx, node, i) for i in range(len(node.input))], {}, [node.output[0]])

    return convert


def _variadic(op):
    """Max/Min/Sum/Mean take any number of inputs: chain binary ops."""

    def convert(ctx, node, attrs):
        names = [inp(ctx, node, i) for i in range(len(node.input))]
        acc = names[0]
        binary = {"Sum": "Add", "Mean": "Add"}.get(op, op)
        for i, name in enumerate(names[1:]):
            last = i == len(names) - 2 and op != "Mean"
            acc = ctx.emit(binary, [acc, name], {}, [node.output[0] if last else ""])[0]
        if op == "Mean":
            count = ctx.new_const(f"{ctx.current}_count", np.asarray(len(names), dtype=ctx.type_of(acc).dtype))
            ctx.emit("Div", [acc, count], {}, [node.output[0]])
        elif len(names) == 1:
            ctx.alias(node.output[0], acc)

    return convert


def _alias(ctx, node, attrs):
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        training = need_const(ctx, node, 2, "training_mode")
        if bool(training):
            raise UnsupportedOpError(node.op_type, ctx.current, "training_mode=True")
    check_only_first_output(ctx, node)
    ctx.alias(node.output[0], inp(ctx, node, 0))


def _where(ctx, node, attrs):
    ctx.emit("Where", [inp(ctx, node, i) for i in range(3)], {}, [node.output[0]])


def _clip(ctx, node, attrs):
    if ctx.opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo_a, hi_a = need_const(ctx, node, 1, "min"), need_const(ctx, node, 2, "max")
        lo = None if lo_a is None else lo_a.item()
        hi = None if hi_a is None else hi_a.item()
    ctx.emit("Clip", [inp(ctx, node, 0)], {"min": lo, "max": hi}, [node.output[0]])


def _gelu(ctx, node, attrs):
    approximate = attrs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise UnsupportedOpError(node.op_type, ctx.current, f"approximate={approximate!r}")
    ctx.emit("Gelu", [inp(ctx, node, 0)], {"approximate": approximate}, [node.output[0]])


def _cast(ctx, node, attrs):
    x = inp(ctx, node, 0)
    if node.op_type == "CastLike":
        to = ctx.type_of(inp(ctx, node, 1)).dtype
    else:
        to = onnx_dtype_name(ctx, node, attrs["to"])
    if ctx.type_of(x).dtype == to:
        ctx.alias(node.output[0], x)
    else:
        ctx.emit("Cast", [x], {"to": to}, [node.output[0]])


# ---------------------------------------------------------------------------- data movement
def _reshape_op(ctx, node, attrs):
    x = inp(ctx, node, 0)
    shape_in = ctx.type_of(x).shape
    target = [int(d) for d in (attrs["shape"] if ctx.opset < 5 else need_const(ctx, node, 1, "shape"))]
    if not attrs.get("allowzero", 0):
        target = [shape_in[i] if d == 0 else d for i, d in enumerate(target)]
    if target.count(-1) > 1:
        raise ShapeError(f"node '{ctx.current}' (Reshape): more than one -1 in {target}")
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        if known == 0 or math.prod(shape_in) % known:
            raise ShapeError(f"node '{ctx.current}' (Reshape): cannot reshape {shape_in} to {target}")
        target[target.index(-1)] = math.prod(shape_in) // known
    reshape_to(ctx, x, target, node.output[0])


def _axes_operand(ctx, node, attrs, first_input_opset: int) -> list[int] | None:
    if ctx.opset >= first_input_opset:
        axes = need_const(ctx, node, 1, "axes")
        return None if axes is None else [int(a) for a in np.atleast_1d(axes)]
    return list(attrs["axes"]) if "axes" in attrs else None


def _squeeze(ctx, node, attrs):
    x = inp(ctx, node, 0)
    shape = ctx.type_of(x).shape
    axes = _axes_operand(ctx, node, attrs, 13)
    drop = {norm_axis(ctx, node, a, len(shape)) for a in axes} if axes is not None else {i for i, d in enumerate(shape) if d == 1}
    if any(shape[a] != 1 for a in drop):
        raise ShapeError(f"node '{ctx.current}' (Squeeze): axes {sorted(drop)} of {shape} are not all 1")
    reshape_to(ctx, x, [d for i, d in enumerate(shape) if i not in drop], node.output[0])


def _unsqueeze(ctx, node, attrs):
    x = inp(ctx, node, 0)
    shape = list(ctx.type_of(x).shape)
    axes = _axes_operand(ctx, node, attrs, 13) or []
    rank = len(shape) + len(axes)
    for a in sorted(norm_axis(ctx, node, a, rank) for a in axes):
        shape.insert(a, 1)
    reshape_to(ctx, x, shape, node.output[0])


def _flatten(ctx, node, attrs):
    x = inp(ctx, node, 0)
    shape = ctx.type_of(x).shape
    axis = attrs.get("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    reshape_to(ctx, x, [math.prod(shape[:axis]), math.prod(shape[axis:])], node.output[0])


def _transpose(ctx, node, attrs):
    x = inp(ctx, node, 0)
    rank = _rank(ctx, x)
    perm = tuple(norm_axis(ctx, node, p, rank) for p in attrs.get("perm", range(rank - 1, -1, -1)))
    if perm == tuple(range(rank)):
        ctx.alias(node.output[0], x)
    else:
        ctx.emit("Transpose", [x], {"perm": perm}, [node.output[0]])


def _concat(ctx, node, attrs):
    names = [inp(ctx, node, i) for i in range(len(node.input)) if node.input[i]]
    if any(ctx.type_of(n).size > 0 for n in names):
        names = [n for n in names if ctx.type_of(n).size > 0]
    axis = norm_axis(ctx, node, attrs["axis"], _rank(ctx, names[0]))
    if len(names) == 1:
        ctx.alias(node.output[0], names[0])
    else:
        ctx.emit("Concat", names, {"axis": axis}, [node.output[0]])


def _gather(ctx, node, attrs):
    data = inp(ctx, node, 0)
    axis = norm_axis(ctx, node, attrs.get("axis", 0), _rank(ctx, data))
    ctx.emit("Gather", [data, inp(ctx, node, 1)], {"axis": axis}, [node.output[0]])


def _gather_nd(ctx, node, attrs):
    """GatherND with constant indices and batch_dims=0 -> Reshape(data) + Gather of linear indices."""
    data = inp(ctx, node, 0)
    if attrs.get("batch_dims", 0):
        raise UnsupportedOpError(node.op_type, ctx.current, "batch_dims != 0")
    idx = need_const(ctx, node, 1, "indices").astype(np.int64)
    shape = ctx.type_of(data).shape
    k = idx.shape[-1]
    dims = np.asarray(shape[:k], dtype=np.int64)
    if np.any(idx >= dims) or np.any(idx < -dims):
        raise ShapeError(f"node '{ctx.current}' (GatherND): index out of range for {shape}")
    idx = np.where(idx < 0, idx + dims, idx)
    strides = np.asarray([math.prod(shape[j + 1 : k]) for j in range(k)], dtype=np.int64)
    flat = reshape_to(ctx, data, (math.prod(shape[:k]),) + shape[k:])
    linear = ctx.new_const(f"{ctx.current}_linear_indices", (idx * strides).sum(-1))
    ctx.emit("Gather", [flat, linear], {"axis": 0}, [node.output[0]])


def clamp_slice(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """ONNX Slice clamping: the result indexes like ``range(start, end, step)``."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


def _slice(ctx, node, attrs):
    x = inp(ctx, node, 0)
    shape = ctx.type_of(x).shape
    if ctx.opset < 10:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = need_const(ctx, node, 1, "starts"), need_const(ctx, node, 2, "ends")
        axes, steps = need_const(ctx, node, 3, "axes"), need_const(ctx, node, 4, "steps")
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    out = {"starts": [], "ends": [], "axes": [], "steps": []}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis, step = norm_axis(ctx, node, int(axis), len(shape)), int(step)
        if step == 0:
            raise ShapeError(f"node '{ctx.current}' (Slice): step 0 on axis {axis}")
        s, e = clamp_slice(int(max(min(start, 2**62), -2**62)), int(max(min(end, 2**62), -2**62)), step, shape[axis])
        for key, v in zip(out, (s, e, axis, step)):
            out[key].append(v)
    ctx.emit("Slice", [x], {k: tuple(v) for k, v in out.items()}, [node.output[0]])


def _split(ctx, node, attrs):
    x = inp(ctx, node, 0)
    shape = ctx.type_of(x).shape
    axis = norm_axis(ctx, node, attrs.get("axis", 0), len(shape))
    n = len(node.output)
    sizes = attrs.get("split") if ctx.opset < 13 else need_const(ctx, node, 1, "split")
    if sizes is None:
        chunk = -(-shape[axis] // n)
        sizes = [min(chunk, shape[axis] - i * chunk) for i in range(n)]
    if sum(int(s) for s in sizes) != shape[axis] or len(sizes) != n:
        raise ShapeError(f"node '{ctx.current}' (Split): sizes {list(sizes)} do not split {shape[axis]} into {n}")
    start = 0
    for size, out in zip(sizes, node.output):
        attrs_s = {"starts": (start,), "ends": (start + int(size),), "axes": (axis,), "steps": (1,)}
        ctx.emit("Slice", [x], attrs_s, [out])
        start += int(size)


def _expand(ctx, node, attrs):
    x = inp(ctx, node, 0)
    target = tuple(int(d) for d in need_const(ctx, node, 1, "shape"))
    try:
        out_shape = tuple(int(d) for d in np.broadcast_shapes(ctx.type_of(x).shape, target))
    except ValueError:
        raise ShapeError(f"node '{ctx.current}' (Expand): {ctx.type_of(x).shape} cannot expand to {target}") from None
    if out_shape == ctx.type_of(x).shape:
        ctx.alias(node.output[0], x)
    else:
        ctx.emit("Expand", [x], {"shape": out_shape}, [node.output[0]])


CONVERTERS = {
    **{op: _same(op) for op in _BINARY + _UNARY},
    **{op: _variadic(op) for op in ("Max", "Min", "Sum", "Mean")},
    "Identity": _alias, "Dropout": _alias, "Where": _where, "Clip": _clip, "Gelu": _gelu,
    "Cast": _cast, "CastLike": _cast,
    "Reshape": _reshape_op, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Flatten": _flatten,
    "Transpose": _transpose, "Concat": _concat, "Gather": _gather, "GatherND": _gather_nd, "Slice": _slice, "Split": _split,
    "Expand": _expand,
}
_DOMAIN_CONVERTERS = {("com.microsoft", "Gelu"): _gelu}


def convert_node(ctx, node: onnx.NodeProto) -> None:
    """Convert one ONNX node (or fold it), binding its outputs in ``ctx``."""
    from .onnx_fold import FOLDERS, fold_with_reference
    from .onnx_nn import NN_CONVERTERS
    from .onnx_qoperator import QOP_CONVERTERS, QOP_DOMAIN_CONVERTERS
    from .onnx_quant import QUANT_CONVERTERS, QUANT_DOMAIN_CONVERTERS

    attrs = attrs_of(node)
    if node.domain not in ("", "ai.onnx"):
        convert = (_DOMAIN_CONVERTERS.get((node.domain, node.op_type)) or QUANT_DOMAIN_CONVERTERS.get((node.domain, node.op_type))
                   or QOP_DOMAIN_CONVERTERS.get((node.domain, node.op_type)))
    else:
        convert = (QOP_CONVERTERS.get(node.op_type) or QUANT_CONVERTERS.get(node.op_type)
                   or CONVERTERS.get(node.op_type) or NN_CONVERTERS.get(node.op_type)
                   or FOLDERS.get(node.op_type))
    if convert is not None:
        convert(ctx, node, attrs)
    elif all(not name or ctx.const(ctx.ir(name)) is not None for name in node.input):
        fold_with_reference(ctx, node)
    else:
        raise UnsupportedOpError(node.op_type if not node.domain else f"{node.domain}.{node.op_type}", ctx.current)
