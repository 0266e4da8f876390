"""Relax lowerings of ``QuantizeAct`` and ``Int8Linear`` (merged into :mod:`.relax_lowering`'s rules).

1. ``QuantizeAct`` dynamic -> one scheduled kernel (per-row absmax + codes, two outputs);
   static -> one elementwise kernel, the scale output a constant.
2. ``Int8Linear`` -> one scheduled GEMM kernel of the kind :func:`.int8_gemm.select` picks
   for the target (VNNI ``vpdpbusd`` on x86, ``smmla`` / ``sdot`` on aarch64, else the portable
   int32 GEMM); the weight constant is packed here, at compile time, for that kind. The
   activation zero-point correction (``128 * sum_k w[k, n]`` for the uint8 kinds, 0 for the
   sign-flipping arm kinds) is an int32 constant. When ``xscale``
   comes from a static ``QuantizeAct``, the kernel takes that scale as a [1, 1] constant.

Kernels are cached per (builder, params) in the lowering context like the float kernels, and
marked opaque so ``FuseOps`` keeps them whole. Refusal: a non-constant weight raises
:class:`UnsupportedOpError` naming the node.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from qcompile.errors import UnsupportedOpError
from qcompile.interpreter_int8 import act_qmax

from . import int8_gemm, int8_kernels

__all__ = ["INT8_LOWERINGS"]

R = relax.op
OPAQUE = 8  # relax OpPatternKind::kOpaque


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.ty.shape)


def _call(ctx, builder: str, params: tuple, args, out_sinfo, **options):
    key = ("int8_kernels." + builder, params, tuple(sorted(options.items())))
    gvar = ctx._kernels.get(key)  # pylint: disable=protected-access  (the context's kernel cache)
    if gvar is None:
        func = getattr(int8_kernels, builder)(*params, ctx.target, **options).with_attr("op_pattern", OPAQUE)
        gvar = ctx.bb.add_func(func, f"{builder.replace('_kernel', '')}_{len(ctx._kernels)}")
        ctx._kernels[key] = gvar  # pylint: disable=protected-access
    return ctx.emit(relax.call_tir(gvar, args, out_sinfo))


def _rows(ctx, x):
    shape = _shape(x)
    m = math.prod(shape[:-1])
    return (x if len(shape) == 2 else ctx.emit(R.reshape(x, (m, shape[-1])))), shape[:-1]


def _quantize_act(ctx, node):
    x, lead = _rows(ctx, ctx.get(node.inputs[0]))
    m, k = _shape(x)
    qmax = int(act_qmax(node.attrs.get("bits", 8)))
    if node.attrs.get("mode", "dynamic") == "static":
        scale = float(node.attrs["scale"])
        u = _call(ctx, "quantize_static_kernel", (m, k, scale), [x], relax.TensorType((m, k), "uint8"), qmax=qmax)
        s = relax.const(np.full((*lead, 1), np.float32(scale), np.float32))
    else:
        out = _call(ctx, "quantize_rows_kernel", (m, k), [x],
                    [relax.TensorType((m, k), "uint8"), relax.TensorType((m, 1), "float32")], qmax=qmax)
        u, s = ctx.emit(relax.TupleGetItem(out, 0)), ctx.emit(relax.TupleGetItem(out, 1))
        if len(lead) != 1:
            s = ctx.emit(R.reshape(s, (*lead, 1)))
    if len(lead) != 1:
        u = ctx.emit(R.reshape(u, (*lead, k)))
    return [u, s]


def _static_scale(ctx, name: str):
    producer = ctx.graph.producers().get(name)
    if producer is not None and producer.op == "QuantizeAct" and producer.attrs.get("mode") == "static":
        return float(producer.attrs["scale"])
    return None


def constant_input(ctx, node, index: int, what: str = "qweight") -> np.ndarray:
    """The constant array feeding ``node.inputs[index]``; UnsupportedOpError if it is computed."""
    name = node.inputs[index]
    if not ctx.graph.is_constant(name):
        raise UnsupportedOpError(node.op, node.name, f"{what} must be a constant")
    return ctx.graph.constants[name]


def _int8_linear(ctx, node):
    w = constant_input(ctx, node, 2)
    k, n = w.shape
    u, lead = _rows(ctx, ctx.get(node.inputs[0]))
    m = _shape(u)[0]
    static = _static_scale(ctx, node.inputs[1])
    if static is not None:
        xscale = relax.const(np.full((1, 1), np.float32(static), np.float32))
    else:
        xscale = ctx.emit(R.reshape(ctx.get(node.inputs[1]), (m, 1)))
    gemm = int8_gemm.select(ctx.target, m, k, n)
    wconst = relax.const(int8_gemm.pack(gemm, w))
    corr = relax.const(int8_gemm.zero_point_correction(gemm, w).astype(np.int32))
    has_bias = len(node.inputs) > 4 and bool(node.inputs[4])
    args = [u, xscale, wconst, ctx.get(node.inputs[3]), corr]
    if has_bias:
        args.append(ctx.get(node.inputs[4]))
    params = (m, k, n, has_bias, static is None, gemm)
    y = _call(ctx, "int8_linear_kernel", params, args, relax.TensorType((m, n), "float32"))
    return y if len(lead) == 1 else ctx.emit(R.reshape(y, (*lead, n)))


INT8_LOWERINGS = {
    "QuantizeAct": (_quantize_act, frozenset({"mode", "scale", "bits"})),
    "Int8Linear": (_int8_linear, frozenset({"wbits"})),
}
