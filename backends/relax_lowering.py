"""Lower a qcompile IR :class:`~qcompile.ir.Graph` to a TVM Relax ``IRModule``.

Shared by every target: nothing here is specific to one CPU. The target is only handed
through to the kernel builders of :mod:`qcompile.backends.kernels`.

Contract of the returned module:

1. ``main`` takes ``graph.inputs`` in order, each a ``R.Tensor`` of the IR's static
   shape and dtype, and ALWAYS returns a ``R.Tuple`` of ``graph.outputs`` in order (also
   for one output). :class:`qcompile.backends.runtime.HostModule` hides the tuple.
2. Constants are embedded as Relax constants, so the built library carries the weights.
   Packed low-bit weights (uint8, with a QuantSpec) stay packed: a 4-bit weight takes
   half a byte per element in the library.
3. Matrix products call destination-passing, already scheduled PrimFuncs (attr
   ``tirx.is_scheduled``) marked ``op_pattern`` = opaque, so ``FuseOps`` leaves them whole.
   Every other op is a ``relax.op.*`` call that the target's pipeline legalizes, fuses
   and schedules.
4. Every emitted value is checked against the IR's declared shape and dtype.

An op, or an attribute value, with no lowering raises :class:`UnsupportedOpError`
naming the op, the node and the reason.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import tvm
from tvm import relax, te, topi

from qcompile.errors import InvariantError, UnsupportedOpError
from qcompile.ir import Graph, Node

from . import kernels, lut_lowering, mlas_float_kernels
from .hadamard_lowering import lower_hadamard
from .relax_lowering_qoperator import QOPERATOR_LOWERINGS
from .relax_lowering_quant import QUANT_LOWERINGS
from .int8_lowering import INT8_LOWERINGS
from .integer_lowering import INTEGER_LOWERINGS
from .integer_nn_lowering import INTEGER_NN_LOWERINGS


__all__ = ["lower_graph", "SUPPORTED_OPS"]

R = relax.op
OPAQUE = 8  # relax OpPatternKind::kOpaque


def lower_graph(graph: Graph, target: tvm.target.Target) -> tvm.IRModule:
    """Build the Relax module of ``graph`` (see the module docstring for its contract)."""
    bb = relax.BlockBuilder()
    params = [relax.Var(_safe(n), relax.TensorType(graph.type_of(n).shape, graph.type_of(n).dtype))
              for n in graph.inputs]
    with bb.function("main", params):
        with bb.dataflow():
            ctx = _Ctx(bb, graph, target, dict(zip(graph.inputs, params)))
            for node in graph.nodes:
                ctx.lower_node(node)
            out = bb.emit_output(relax.Tuple([ctx.get(n) for n in graph.outputs]))
        bb.emit_func_output(out)
    return bb.get()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "v"


class _Ctx:
    """State of one lowering: the value environment and a cache of kernel GlobalVars."""

    def __init__(self, bb, graph, target, env):
        self.bb, self.graph, self.target, self.env = bb, graph, target, env
        self._kernels: dict[tuple, relax.GlobalVar] = {}
        self.fused: set[str] = set()  # names of nodes a producer's kernel already computes
        self._consumers: dict[str, list[Node]] | None = None

    def consumers(self) -> dict[str, list[Node]]:
        """``graph.consumers()``, computed once per lowering."""
        if self._consumers is None:
            self._consumers = self.graph.consumers()
        return self._consumers

    # -- values ----------------------------------------------------------------
    def get(self, name: str):
        if name not in self.env:
            if not self.graph.is_constant(name):
                raise InvariantError(f"value '{name}' used before definition")
            self.env[name] = relax.const(self.graph.constants[name])
        return self.env[name]

    def emit(self, expr):
        return self.bb.emit(expr)

    def lower_node(self, node: Node) -> None:
        if node.name in self.fused:
            return
        rule = _RULES.get(node.op)
        if rule is None:
            raise UnsupportedOpError(node.op, node.name, "no Relax lowering for this op")
        fn, allowed = rule
        extra = set(node.attrs) - allowed
        if extra:
            raise UnsupportedOpError(node.op, node.name, f"unknown attribute(s) {sorted(extra)}")
        result = fn(self, node)
        if isinstance(result, dict):  # values by name: a fusing rule defines its fused consumers' outputs
            pairs = result.items()
        else:
            pairs = zip(node.outputs, result if isinstance(result, (list, tuple)) else [result])
        for name, value in pairs:
            self._check(node, name, value)
            self.env[name] = value

    def _check(self, node, name, value):
        want = self.graph.type_of(name)
        ty = value.ty
        got = tuple(int(d) for d in ty.shape)
        if got != tuple(want.shape) or str(ty.dtype) != want.dtype:
            raise InvariantError(f"node '{node.name}' ({node.op}): lowered '{name}' is {ty.dtype}{list(got)}, "
                                 f"IR declares {want.dtype}{list(want.shape)}")

    # -- kernels ---------------------------------------------------------------
    def call_kernel(self, builder: str, params: tuple, args, out_shape, out_dtype="float32", builders=kernels):
        key = (builder, params)
        gvar = self._kernels.get(key)
        if gvar is None:
            func = getattr(builders, builder)(*params, self.target)
            func = func.with_attr("op_pattern", OPAQUE)
            gvar = self.bb.add_func(func, f"{builder.replace('_kernel', '')}_{len(self._kernels)}")
            self._kernels[key] = gvar
        return self.emit(relax.call_tir(gvar, args, relax.TensorType(out_shape, out_dtype)))


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.ty.shape)


def _attr(node, key, default=None):
    return node.attrs.get(key, default)


# ---------------------------------------------------------------------------- elementwise
_BINARY = {
    "Add": R.add, "Sub": R.subtract, "Mul": R.multiply, "Div": R.divide, "Pow": R.power,
    "Max": R.maximum, "Min": R.minimum, "Equal": R.equal, "Less": R.less, "Greater": R.greater,
    "LessOrEqual": R.less_equal, "GreaterOrEqual": R.greater_equal,
    "And": R.logical_and, "Or": R.logical_or,
}
_UNARY = {
    "Sqrt": R.sqrt, "Tanh": R.tanh, "Relu": R.nn.relu, "Sigmoid": R.sigmoid,
    "Exp": R.exp, "Log": R.log, "Neg": R.negative, "Abs": R.abs, "Not": R.logical_not,
    "IsNaN": R.isnan,
}


def _binary(ctx, node):
    a, b = ctx.get(node.inputs[0]), ctx.get(node.inputs[1])
    if node.op == "Mul" and str(a.ty.dtype).startswith("float"):
        return ctx.bb.emit_te(_rounded_multiply, a, b, primfunc_name_hint="multiply")
    return ctx.emit(_BINARY[node.op](a, b))


def _rounded_multiply(a, b):
    """Broadcast float ``a * b``, its product rounded on its own.

    The IR (like ONNX and the interpreter) rounds every op's result. TVM builds with LLVM's
    ``AllowFPOpFusion = Fast``, so a product that feeds an add in the same fused kernel would
    become one ``fma``, rounded once: a 1-ulp difference that flips quantization codes
    downstream (e.g. ``MatMulInteger -> Mul(scale) -> Add(bias)`` before a
    ``DynamicQuantizeLinear``). ``llvm.arithmetic.fence`` keeps the product out of any
    contraction and compiles to nothing on x86 and aarch64.
    """
    product = topi.multiply(a, b)
    return te.compute(product.shape, lambda *i: mlas_float_kernels.fence(product(*i), product.dtype),
                      name="rounded_multiply")


def _unary(ctx, node):
    return ctx.emit(_UNARY[node.op](ctx.get(node.inputs[0])))


def _emit_erf(ctx, x):
    """onnxruntime's erf (:func:`.mlas_float_kernels.erf_compute`), elementwise and fusable."""
    return ctx.bb.emit_te(mlas_float_kernels.erf_compute, x, primfunc_name_hint="erf")


def _erf(ctx, node):
    return _emit_erf(ctx, ctx.get(node.inputs[0]))


def _identity(ctx, node):
    return ctx.get(node.inputs[0])


def _reciprocal(ctx, node):
    x = ctx.get(node.inputs[0])
    return ctx.emit(R.divide(relax.const(1, str(x.ty.dtype)), x))


def _where(ctx, node):
    return ctx.emit(R.where(*(ctx.get(n) for n in node.inputs)))


def _clip(ctx, node):
    x = ctx.get(node.inputs[0])
    dtype = str(x.ty.dtype)
    lo, hi = _attr(node, "min"), _attr(node, "max")
    if lo is not None:
        x = ctx.emit(R.maximum(x, relax.const(lo, dtype)))
    if hi is not None:
        x = ctx.emit(R.minimum(x, relax.const(hi, dtype)))
    return x


def _gelu(ctx, node):
    approx = _attr(node, "approximate", "none")
    if approx not in ("none", "tanh"):
        raise UnsupportedOpError(node.op, node.name, f"approximate={approx!r}")
    x = ctx.get(node.inputs[0])
    if approx == "tanh":
        return ctx.emit(R.nn.gelu_tanh(x))
    # 0.5 * x * (1 + erf(x / sqrt(2))) with onnxruntime's erf, as the interpreter computes it
    scaled = ctx.emit(R.divide(x, relax.const(np.float32(np.sqrt(2)), "float32")))
    erf = _emit_erf(ctx, scaled)
    one_plus = ctx.emit(R.add(relax.const(np.float32(1), "float32"), erf))
    return ctx.emit(R.multiply(ctx.emit(R.multiply(relax.const(np.float32(0.5), "float32"), x)), one_plus))


def _cast(ctx, node):
    return ctx.emit(R.astype(ctx.get(node.inputs[0]), str(np.dtype(node.attrs["to"]))))


# ---------------------------------------------------------------------------- reductions
def _softmax(ctx, node):
    """Softmax along one axis: onnxruntime's rounding (:mod:`.mlas_float_kernels`) on the rows."""
    x = ctx.get(node.inputs[0])
    shape = list(_shape(x))
    axis = int(_attr(node, "axis", -1)) % len(shape)
    last = axis == len(shape) - 1
    order = [d for d in range(len(shape)) if d != axis] + [axis]
    moved = x if last else ctx.emit(R.permute_dims(x, order))
    moved_shape = [shape[d] for d in order]
    rows, n = math.prod(moved_shape[:-1]), moved_shape[-1]
    y = ctx.call_kernel("softmax_kernel", (rows, n), [ctx.emit(R.reshape(moved, (rows, n)))], (rows, n),
                        builders=mlas_float_kernels)
    y = ctx.emit(R.reshape(y, moved_shape))
    return y if last else ctx.emit(R.permute_dims(y, [order.index(d) for d in range(len(shape))]))


def _layer_norm(ctx, node):
    """LayerNorm over axes ``axis..last``: onnxruntime's rounding (:mod:`.mlas_float_kernels`) per row.

    Rows shorter than the kernel's eight lanes (onnxruntime's scalar Welford path) keep TVM's
    ``layer_norm``; :mod:`qcompile.mlas_float` documents the difference.
    """
    x, scale = ctx.get(node.inputs[0]), ctx.get(node.inputs[1])
    shape = _shape(x)
    axis = int(_attr(node, "axis", -1)) % len(shape)
    has_bias = len(node.inputs) > 2 and node.inputs[2]
    bias = ctx.get(node.inputs[2]) if has_bias else relax.const(np.zeros(_shape(scale), str(scale.ty.dtype)))
    eps = float(_attr(node, "epsilon", 1e-5))
    rows, n = math.prod(shape[:axis]), math.prod(shape[axis:])
    if n < mlas_float_kernels.LN_LANES:
        return ctx.emit(R.nn.layer_norm(x, scale, bias, axes=list(range(axis, len(shape))), epsilon=eps))

    def flat(v):
        return ctx.emit(R.reshape(ctx.emit(R.broadcast_to(v, shape[axis:])), (n,)))

    y = ctx.call_kernel("layer_norm_kernel", (rows, n, eps), [ctx.emit(R.reshape(x, (rows, n))), flat(scale), flat(bias)],
                        (rows, n), builders=mlas_float_kernels)
    return ctx.emit(R.reshape(y, shape))


_REDUCE = {"ReduceMean": R.mean, "ReduceSum": R.sum, "ReduceMax": R.max, "ReduceMin": R.min}


def _reduce(ctx, node):
    x = ctx.get(node.inputs[0])
    axes = _attr(node, "axes")
    axes = list(range(len(_shape(x)))) if not axes else [int(a) for a in axes]
    keep = bool(_attr(node, "keepdims", True))
    if node.op == "ReduceL2":
        return ctx.emit(R.sqrt(ctx.emit(R.sum(ctx.emit(R.multiply(x, x)), axes, keep))))
    return ctx.emit(_REDUCE[node.op](x, axes, keep))


# ---------------------------------------------------------------------------- data movement
def _reshape(ctx, node):
    return ctx.emit(R.reshape(ctx.get(node.inputs[0]), tuple(int(d) for d in node.attrs["shape"])))


def _transpose(ctx, node):
    perm = _attr(node, "perm")
    return ctx.emit(R.permute_dims(ctx.get(node.inputs[0]), None if perm is None else [int(p) for p in perm]))


def _gather(ctx, node):
    data, idx = ctx.get(node.inputs[0]), ctx.get(node.inputs[1])
    axis = int(_attr(node, "axis", 0)) % len(_shape(data))
    # "wrap" is i mod bound: the ONNX meaning of -bound <= i < 0, and never a read out of bounds
    return ctx.emit(R.take(data, idx, axis=axis, mode="wrap"))


def _wrap_index(ctx, idx, bound: int):
    """i mod bound: ONNX's meaning of negative indices; out-of-range ids cannot read out of bounds."""
    return ctx.emit(R.floor_mod(idx, relax.const(bound, str(idx.ty.dtype))))


def _slice(ctx, node):
    x = ctx.get(node.inputs[0])
    axes = [int(a) for a in node.attrs["axes"]]
    steps = [int(s) for s in _attr(node, "steps", None) or [1] * len(axes)]
    return ctx.emit(R.strided_slice(x, axes, [int(s) for s in node.attrs["starts"]],
                                    [int(e) for e in node.attrs["ends"]], steps, assume_inbound=True))


def _concat(ctx, node):
    return ctx.emit(R.concat([ctx.get(n) for n in node.inputs if n], axis=int(node.attrs["axis"])))


def _expand(ctx, node):
    shape = tuple(int(d) for d in node.attrs["shape"])
    x = ctx.get(node.inputs[0])
    return x if _shape(x) == shape else ctx.emit(R.broadcast_to(x, shape))


# ---------------------------------------------------------------------------- linear algebra
def _as_matrix(ctx, x):
    """x[..., k] -> (x[m, k], leading dims)."""
    shape = _shape(x)
    m = math.prod(shape[:-1])
    return (x if len(shape) == 2 else ctx.emit(R.reshape(x, (m, shape[-1])))), shape[:-1]


def _restore(ctx, y, lead, n):
    return y if len(lead) == 1 else ctx.emit(R.reshape(y, (*lead, n)))


def _linear(ctx, node):
    x, lead = _as_matrix(ctx, ctx.get(node.inputs[0]))
    w = ctx.get(node.inputs[1])
    (m, k), n = _shape(x), _shape(w)[1]
    args = [x, w]
    if len(node.inputs) > 2 and node.inputs[2]:
        args.append(ctx.get(node.inputs[2]))
    y = ctx.call_kernel("linear_kernel", (m, k, n, len(args) == 3), args, (m, n))
    return _restore(ctx, y, lead, n)


def _qlinear(ctx, node):
    x, lead = _as_matrix(ctx, ctx.get(node.inputs[0]))
    spec = ctx.graph.values[node.inputs[1]].quant
    if spec is None or spec.packing != "n_major_lsb_first":
        raise UnsupportedOpError(node.op, node.name, "qweight needs a QuantSpec with packing n_major_lsb_first")
    k, n = spec.logical_shape
    bits, gs, sym = int(node.attrs["bits"]), int(node.attrs.get("group_size", 0)), bool(node.attrs["symmetric"])
    ins = list(node.inputs) + [""] * (5 - len(node.inputs))
    _check_zeros(node, ins[3], sym)
    if lut_lowering.m1_kernel(ctx.graph, node) in ("vnni", "lut"):  # batch-1 GEMV, chosen before lowering
        return _restore(ctx, lut_lowering.lower_m1_qlinear(ctx, node, x), lead, n)
    args = [x, ctx.get(ins[1]), ctx.get(ins[2])]
    if not sym:
        args.append(ctx.get(ins[3]))
    has_bias = bool(ins[4])
    if has_bias:
        args.append(ctx.get(ins[4]))
    y = ctx.call_kernel("qlinear_kernel", (_shape(x)[0], k, n, bits, gs, sym, has_bias), args, (_shape(x)[0], n))
    return _restore(ctx, y, lead, n)


def _qgather(ctx, node):
    spec = ctx.graph.values[node.inputs[0]].quant
    if spec is None or spec.packing != "n_major_lsb_first":
        raise UnsupportedOpError(node.op, node.name, "qtable needs a QuantSpec with packing n_major_lsb_first")
    v, d = spec.logical_shape
    bits, gs, sym = int(node.attrs["bits"]), int(node.attrs.get("group_size", 0)), bool(node.attrs["symmetric"])
    idx = ctx.get(node.inputs[-1])
    idx_shape = _shape(idx)
    count = math.prod(idx_shape)
    idx = ctx.emit(R.astype(idx, "int64")) if str(idx.ty.dtype) != "int64" else idx
    idx = _wrap_index(ctx, ctx.emit(R.reshape(idx, (count,))), v)
    _check_zeros(node, node.inputs[2] if len(node.inputs) == 4 else "", sym)
    args = [ctx.get(node.inputs[0]), ctx.get(node.inputs[1])]
    if not sym:
        args.append(ctx.get(node.inputs[2]))
    y = ctx.call_kernel("qgather_kernel", (v, d, count, bits, gs, sym), args + [idx], (count, d))
    return ctx.emit(R.reshape(y, (*idx_shape, d)))


def _check_zeros(node, zeros: str, symmetric: bool) -> None:
    """Optional inputs are positional ("" when absent): zeros present iff asymmetric."""
    if bool(zeros) == symmetric:
        state = "has" if zeros else "lacks"
        raise UnsupportedOpError(node.op, node.name, f"symmetric={symmetric} but the node {state} a zeros input")


def _matmul(ctx, node):
    a, b = ctx.get(node.inputs[0]), ctx.get(node.inputs[1])
    if str(a.ty.dtype) != "float32" or str(b.ty.dtype) != "float32":
        raise UnsupportedOpError(node.op, node.name, "MatMul is lowered for float32 operands only")
    sa, sb = _shape(a), _shape(b)
    if len(sa) == 1:
        a, sa = ctx.emit(R.reshape(a, (1, sa[0]))), (1, sa[0])
    if len(sb) == 1:
        b, sb = ctx.emit(R.reshape(b, (sb[0], 1))), (sb[0], 1)
    out_shape = tuple(ctx.graph.type_of(node.outputs[0]).shape)
    (m, k), n = sa[-2:], sb[-1]
    if math.prod(sb[:-2]) == 1:  # b is one matrix: fold a's batch into its rows
        x, _ = _as_matrix(ctx, a)
        w = b if len(sb) == 2 else ctx.emit(R.reshape(b, (k, n)))
        y = ctx.call_kernel("linear_kernel", (_shape(x)[0], k, n, False), [x, w], (_shape(x)[0], n))
    else:
        batch = tuple(np.broadcast_shapes(sa[:-2], sb[:-2]))
        count = math.prod(batch)
        a3 = _batched(ctx, a, batch, (m, k), count)
        b3 = _batched(ctx, b, batch, (k, n), count)
        y = ctx.call_kernel("batch_matmul_kernel", (count, m, k, n), [a3, b3], (count, m, n))
    return ctx.emit(R.reshape(y, out_shape)) if _shape(y) != out_shape else y


def _batched(ctx, x, batch, mat, count):
    if _shape(x)[:-2] != batch:
        x = ctx.emit(R.broadcast_to(x, (*batch, *mat)))
    return x if len(_shape(x)) == 3 and _shape(x)[0] == count else ctx.emit(R.reshape(x, (count, *mat)))


# ---------------------------------------------------------------------------- convolution
def _pair(node, key, default, count=2):
    value = tuple(int(v) for v in (_attr(node, key) or default))
    if len(value) != count:
        raise UnsupportedOpError(node.op, node.name, f"{key}={list(value)}: only 2-D (NCHW) is lowered")
    return value


def _conv(ctx, node):
    x, w = ctx.get(node.inputs[0]), ctx.get(node.inputs[1])
    if len(_shape(x)) != 4:
        raise UnsupportedOpError(node.op, node.name, "only 2-D (NCHW) convolution is lowered")
    y = ctx.emit(R.nn.conv2d(x, w, strides=_pair(node, "strides", (1, 1)),
                             padding=_pair(node, "pads", (0, 0, 0, 0), 4),
                             dilation=_pair(node, "dilations", (1, 1)), groups=int(_attr(node, "group", 1))))
    if len(node.inputs) > 2 and node.inputs[2]:
        bias = ctx.emit(R.reshape(ctx.get(node.inputs[2]), (1, -1, 1, 1)))
        y = ctx.emit(R.add(y, bias))
    return y


def _pool(ctx, node):
    x = ctx.get(node.inputs[0])
    if len(_shape(x)) != 4:
        raise UnsupportedOpError(node.op, node.name, "only 2-D (NCHW) pooling is lowered")
    kernel = _pair(node, "kernel_shape", ())
    kw = dict(pool_size=kernel, strides=_pair(node, "strides", (1, 1)),
              padding=_pair(node, "pads", (0, 0, 0, 0), 4), ceil_mode=bool(_attr(node, "ceil_mode", 0)))
    if node.op == "MaxPool":
        return ctx.emit(R.nn.max_pool2d(x, **kw))
    return ctx.emit(R.nn.avg_pool2d(x, count_include_pad=bool(_attr(node, "count_include_pad", 0)), **kw))


def _global_avg_pool(ctx, node):
    x = ctx.get(node.inputs[0])
    return ctx.emit(R.mean(x, list(range(2, len(_shape(x)))), keepdims=True))


_POOL_ATTRS = {"kernel_shape", "strides", "pads", "ceil_mode", "count_include_pad"}
_RULES = MappingProxyType({
    **{op: (_binary, frozenset()) for op in _BINARY},
    **{op: (_unary, frozenset()) for op in _UNARY},
    "Erf": (_erf, frozenset()),
    "Identity": (_identity, frozenset()),
    "Reciprocal": (_reciprocal, frozenset()),
    "Where": (_where, frozenset()),
    "Clip": (_clip, frozenset({"min", "max"})),
    "Gelu": (_gelu, frozenset({"approximate"})),
    "Hadamard": (lower_hadamard, frozenset({"size", "axis"})),
    "Cast": (_cast, frozenset({"to"})),
    "Softmax": (_softmax, frozenset({"axis"})),
    "LayerNorm": (_layer_norm, frozenset({"axis", "epsilon"})),
    **{op: (_reduce, frozenset({"axes", "keepdims"})) for op in (*_REDUCE, "ReduceL2")},
    "MatMul": (_matmul, frozenset()),
    "Linear": (_linear, frozenset()),
    "QLinear": (_qlinear, frozenset({"bits", "group_size", "symmetric"})),
    "QGather": (_qgather, frozenset({"bits", "group_size", "symmetric"})),
    "Reshape": (_reshape, frozenset({"shape"})),
    "Transpose": (_transpose, frozenset({"perm"})),
    "Gather": (_gather, frozenset({"axis"})),
    "Slice": (_slice, frozenset({"starts", "ends", "axes", "steps"})),
    "Concat": (_concat, frozenset({"axis"})),
    "Expand": (_expand, frozenset({"shape"})),
    "Conv": (_conv, frozenset({"strides", "pads", "dilations", "group", "kernel_shape"})),
    "MaxPool": (_pool, frozenset(_POOL_ATTRS)),
    "AveragePool": (_pool, frozenset(_POOL_ATTRS)),
    "GlobalAveragePool": (_global_avg_pool, frozenset()),
    **QUANT_LOWERINGS,
    **QOPERATOR_LOWERINGS,
    **INT8_LOWERINGS,
    **INTEGER_LOWERINGS,
    **INTEGER_NN_LOWERINGS,
})
SUPPORTED_OPS = frozenset(_RULES)

