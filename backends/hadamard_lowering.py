"""Relax lowering of the IR op ``Hadamard(x) attrs: size, axis=-1`` (see :mod:`qcompile.ops`).

``y = x @ kron(I, H_size)`` along the last axis, ``H_size`` the normalized Hadamard matrix of
:func:`qcompile.hadamard.hadamard`. With ``size = p * 2^k`` (:func:`qcompile.hadamard.factor`)
x is viewed as ``[M, p, 2^k]`` and lowered as a chain of ``call_tir`` kernels built from TE:

1. k butterfly stages (fast Walsh-Hadamard transform, O(n log n)); each stage is
   branch-free: ``y[i] = y[i ^ h] + (1 - 2 bit_h(i)) * y[i]``;
2. for p > 1, a contraction with the constant +-1 matrix ``H_p`` (p x p, e.g. 12 x 12)
   over the p axis, then the ``1/sqrt(size)`` scale.

Each stage is its own PrimFunc marked ``op_pattern`` opaque: fusing the butterflies would
inline them into one O(n^2) expression. The target's schedule rules parallelise them. Only float32 on the last axis is lowered (UnsupportedOpError otherwise).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, te

from qcompile.errors import UnsupportedOpError
from qcompile.hadamard import factor, hadamard_unnormalized

__all__ = ["lower_hadamard"]

_OPAQUE = 8  # relax OpPatternKind::kOpaque: keep each stage its own kernel


def _butterfly(y: te.Tensor, h: int, scale):
    shape = tuple(int(d) for d in y.shape)

    def body(i, a, j):
        bit = tvm.tirx.floormod(tvm.tirx.floordiv(j, h), 2)
        partner = j + h - 2 * h * bit
        sign = (1 - 2 * bit).astype("float32")
        val = y[i, a, partner] + sign * y[i, a, j]
        return val * scale if scale is not None else val

    return te.compute(shape, body, name=f"fwht_{h}")


def _stage_funcs(x_shape, p: int, two_k: int, size: int):
    """(name, PrimFunc, needs_hp) per stage: one opaque PrimFunc each, so FuseOps cannot
    inline the butterflies into each other (that would expand to an O(n^2) expression)."""
    scale = tvm.tirx.const(1.0 / math.sqrt(size), "float32")
    funcs = []
    h = 1
    while h < two_k:
        x = te.placeholder(x_shape, "float32", name="x")
        last = h * 2 >= two_k and p == 1
        funcs.append((f"fwht_{h}", te.create_prim_func([x, _butterfly(x, h, scale if last else None)]), False))
        h *= 2
    if p > 1 or two_k == 1:
        x = te.placeholder(x_shape, "float32", name="x")
        hp = te.placeholder((p, p), "float32", name="hp")
        red = te.reduce_axis((0, p), name="a")
        y = te.compute(x_shape, lambda i, b, j: te.sum(x[i, red, j] * hp[red, b] * scale, axis=red), name="hadamard_p")
        funcs.append(("hadamard_p", te.create_prim_func([x, hp, y]), True))
    return funcs


def lower_hadamard(ctx, node):
    """Lowering rule for :mod:`qcompile.backends.relax_lowering` (ctx: its ``_Ctx``)."""
    x = ctx.get(node.inputs[0])
    shape = tuple(int(d) for d in x.ty.shape)
    axis = int(node.attrs.get("axis", -1))
    size = int(node.attrs["size"])
    if axis not in (-1, len(shape) - 1) or str(x.ty.dtype) != "float32":
        raise UnsupportedOpError(node.op, node.name, "only float32 Hadamard on the last axis is lowered")
    f = factor(size)
    if f is None or shape[-1] % size:
        raise UnsupportedOpError(node.op, node.name, f"size {size} is not a supported Hadamard order dividing {shape[-1]}")
    p, two_k = f
    x3_shape = (math.prod(shape) // size, p, two_k)
    y = ctx.emit(relax.op.reshape(x, x3_shape))
    cache = ctx.__dict__.setdefault("_hadamard_funcs", {})
    for name, func, needs_hp in _stage_funcs(x3_shape, p, two_k, size):
        key = (name, x3_shape, size)
        if key not in cache:
            fname = f"hadamard_{name}_{len(cache)}"
            func = func.with_attr("op_pattern", _OPAQUE).without_attr("global_symbol")
            cache[key] = ctx.bb.add_func(func, fname)
        args = [y, relax.const(hadamard_unnormalized(p).astype(np.float32))] if needs_hp else [y]
        y = ctx.emit(relax.call_tir(cache[key], args, relax.TensorType(x3_shape, "float32")))
    return ctx.emit(relax.op.reshape(y, shape))
