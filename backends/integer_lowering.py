"""Relax lowerings of the integer-only ops (merged into :mod:`.relax_lowering`'s rules).

1. ``IntLinear`` -> one scheduled int8 GEMM kernel (the kind :func:`.int8_gemm.select` picks:
   VNNI, smmla, sdot or portable; the weight packed here at compile time) with an int32
   epilogue; ``bias - zero_point_correction`` is folded into one int32 constant. The chain of
   ``Requantize`` / ``Lut`` nodes that only rescales its result (:mod:`.int_epilogue`) runs in
   that epilogue: those nodes are lowered here and skipped later. Opaque to ``FuseOps``.
2. ``IntConv`` -> ``relax.op.nn.conv2d`` on int8 (codes minus 128) with ``out_dtype`` int32
   (legalized to an integer TIR convolution), plus the int32 bias.
3. ``Requantize`` -> a TE function (``emit_te``) around ``tirx.q_multiply_shift_per_axis``;
   ``FuseOps`` may fuse it with its integer neighbours (Clip, Add, pooling).

Refusal: a non-constant weight raises :class:`UnsupportedOpError` naming the node.
"""

from __future__ import annotations

import math
import re

import numpy as np
from tvm import relax

from qcompile.errors import UnsupportedOpError

from . import int8_gemm, int_epilogue, integer_kernels
from .int8_lowering import constant_input

__all__ = ["INTEGER_LOWERINGS", "BOUNDARY_KERNELS", "float_primfuncs"]

R = relax.op
OPAQUE = 8  # relax OpPatternKind::kOpaque
# name prefixes of the PrimFuncs of the float boundary: static QuantizeAct and DequantizeLinear
BOUNDARY_KERNELS = ("quantize_static", "dequantize_linear")
_FLOAT = re.compile(r"\b(?:float|bfloat)\d+")


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.ty.shape)


def _int_linear(ctx, node):
    w = constant_input(ctx, node, 1)
    k, n = w.shape
    x = ctx.get(node.inputs[0])
    shape = _shape(x)
    m = math.prod(shape[:-1])
    u = x if len(shape) == 2 else ctx.emit(R.reshape(x, (m, k)))
    gemm = int8_gemm.select(ctx.target, m, k, n)
    corr = -int8_gemm.zero_point_correction(gemm, w)
    bias = ctx.graph.constants[node.inputs[2]].astype(np.int64) if len(node.inputs) > 2 and node.inputs[2] else 0
    row_mult = len(node.inputs) > 3 and bool(node.inputs[3])
    if row_mult:  # (acc + corr) * 2**r + bias: the correction goes in before the row multiplier
        rows = [relax.const(corr.astype(np.int32)), ctx.emit(R.reshape(ctx.get(node.inputs[3]), (m, 1)))]
        bias = np.broadcast_to(np.asarray(bias, np.int64), (n,))
    else:
        rows, bias = [], corr + bias
    chain = int_epilogue.fusible_chain(ctx.graph, node.outputs[0], ctx.consumers())
    steps = tuple(int_epilogue.step_of(ctx.graph, c) for c in chain)
    consts = [ctx.get(name) for c in chain for name in c.inputs[1:]]
    out = chain[-1].outputs[0] if chain else node.outputs[0]
    key = ("integer_kernels.int_linear_kernel", (m, k, n, gemm, steps, row_mult))
    gvar = ctx._kernels.get(key)  # pylint: disable=protected-access  (the context's kernel cache)
    if gvar is None:
        func = integer_kernels.int_linear_kernel(m, k, n, gemm, ctx.target, steps, row_mult).with_attr("op_pattern", OPAQUE)
        gvar = ctx.bb.add_func(func, f"int_linear_{len(ctx._kernels)}")
        ctx._kernels[key] = gvar  # pylint: disable=protected-access
    args = [u, relax.const(int8_gemm.pack(gemm, w)), relax.const(bias.astype(np.int32)), *rows, *consts]
    y = ctx.emit(relax.call_tir(gvar, args, relax.TensorType((m, n), ctx.graph.type_of(out).dtype)))
    ctx.fused.update(c.name for c in chain)
    return {out: y if len(shape) == 2 else ctx.emit(R.reshape(y, (*shape[:-1], n)))}


def _int_conv(ctx, node):
    x = ctx.get(node.inputs[0])
    if len(_shape(x)) != 4:
        raise UnsupportedOpError(node.op, node.name, "only 2-D (NCHW) convolution is lowered")
    constant_input(ctx, node, 1, "the weight")
    at = node.attrs
    q = ctx.emit(R.astype(ctx.emit(R.subtract(ctx.emit(R.astype(x, "int32")), relax.const(128, "int32"))), "int8"))
    y = ctx.emit(R.nn.conv2d(q, ctx.get(node.inputs[1]), strides=tuple(at.get("strides") or (1, 1)),
                             padding=tuple(at.get("pads") or (0, 0, 0, 0)),
                             dilation=tuple(at.get("dilations") or (1, 1)), groups=int(at.get("group", 1)),
                             out_dtype="int32"))
    if len(node.inputs) > 2 and node.inputs[2]:
        y = ctx.emit(R.add(y, ctx.emit(R.reshape(ctx.get(node.inputs[2]), (1, -1, 1, 1)))))
    return y


def _requantize(ctx, node):
    x, mult, shift = (ctx.get(n) for n in node.inputs)
    at = node.attrs
    rank = len(_shape(x))
    return ctx.bb.emit_te(integer_kernels.requantize_compute, x, mult, shift, int(at.get("axis", -1)) % rank,
                          str(at["out_dtype"]), int(at.get("qmin", -127)), int(at.get("qmax", 127)),
                          primfunc_name_hint="requantize")


INTEGER_LOWERINGS = {
    "IntLinear": (_int_linear, frozenset({"wbits"})),
    "IntConv": (_int_conv, frozenset({"strides", "pads", "dilations", "group"})),
    "Requantize": (_requantize, frozenset({"axis", "out_dtype", "qmin", "qmax"})),
}


def float_primfuncs(mod) -> dict[str, list[str]]:
    """PrimFunc name -> float dtypes named anywhere in its TIR (buffers, casts, constants, locals).

    Looks at every PrimFunc that a Relax function of ``mod`` calls (e.g. the module after the
    target's Relax pipeline, before codegen; PrimFuncs left behind unused, such as a reshape
    turned into a runtime view, are skipped) through its TVMScript text, so nothing typed float
    can hide in a nested expression.
    """
    from tvm import ir, tirx

    called: set[str] = set()

    def visit(expr):
        if isinstance(expr, ir.GlobalVar):
            called.add(expr.name_hint)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    found = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and gvar.name_hint in called:
            dtypes = sorted(set(_FLOAT.findall(func.script())))
            if dtypes:
                found[gvar.name_hint] = dtypes
    return found
