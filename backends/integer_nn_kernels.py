"""TE computes of the integer-only transformer ops (IntLayerNorm, IntSoftmax, Lut, IntRowQuantize, isqrt).

Each compute is, operation for operation, the reference in
:mod:`qcompile.interpreter_integer_nn` (same integer widths, floor divisions of non-negative
numerators, round-half-up shifts, the same fixed isqrt sequence), so compiled and reference
agree bit for bit. Nothing here names a float type. The row-wise computes (layer norm, softmax)
are emitted with ``emit_te`` and scheduled by the CPU ``RowReduction`` rule like their float
counterparts (rows in parallel, vectorised reductions).
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from qcompile.interpreter_integer_nn import (DIFF_CAP, INV_BITS, NEWTON_STEPS, NORM_DROP, ROW_CODE_BITS,
                                             SOFTMAX_OUT_BITS, VAR_BITS)

__all__ = ["isqrt_kernel", "ln_mean_compute", "ln_var_compute", "ln_normalize_compute", "int_softmax_compute",
           "lut_compute", "row_shift_compute", "row_mult_compute", "row_codes_compute"]


def _i64(v: int):
    return tirx.const(v, "int64")


def _i32(v: int):
    return tirx.const(v, "int32")


def _rshift_round(x, shift: int):
    return x if shift <= 0 else (x + _i64(1 << (shift - 1))) >> _i64(shift)


def isqrt_kernel(rows: int, target=None) -> tirx.PrimFunc:
    """PrimFunc (v int64[rows], out int64[rows]): floor(sqrt(v)), at least 1, one row per iteration.

    Written as a loop of small statements on a local scratch (t, bits, x) rather than as TE: the
    chain of dependent selects and Newton steps, once inlined into one expression, makes TVM's
    simplifier exponential.
    """
    del target  # plain scalar loop: the same code on every CPU
    with IRBuilder() as ib:
        with T.prim_func():
            v = T.arg("v", T.buffer((rows,), "int64"))
            out = T.arg("out", T.buffer((rows,), "int64"))
            with T.sblock("root"):  # a root block, as TVM's dataflow analyses expect of a PrimFunc
                with T.serial(0, rows) as r:  # ~100 ns per row: not worth a thread launch
                    s = T.decl_buffer((3,), "int64", scope="local")  # t, bits, x
                    T.buffer_store(s, v[r], [0])
                    T.buffer_store(s, _i64(0), [1])
                    for step in (32, 16, 8, 4, 2, 1):
                        hit = s[0] >= _i64(1 << step)
                        T.buffer_store(s, tirx.Select(hit, s[1] + _i64(step), s[1]), [1])
                        T.buffer_store(s, tirx.Select(hit, s[0] >> _i64(step), s[0]), [0])
                    bits = s[1] + tirx.Select(s[0] >= _i64(1), _i64(1), _i64(0))
                    T.buffer_store(s, _i64(1) << ((bits + _i64(1)) >> _i64(1)), [2])
                    for _ in range(NEWTON_STEPS):
                        newton = (s[2] + tirx.floordiv(v[r], s[2])) >> _i64(1)
                        T.buffer_store(s, te.max(te.min(s[2], newton), _i64(1)), [2])
                    T.buffer_store(out, s[2], [r])
    func = ib.get()
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True)


def ln_mean_compute(x: te.Tensor) -> te.Tensor:
    """int64 per-row ``floor((sum x + N // 2) / N)`` over the last axis."""
    *rows, n = (int(d) for d in x.shape)
    k = te.reduce_axis((0, n), name="k")
    total = te.compute(rows, lambda *i: te.sum(x[(*i, k)].astype("int64"), axis=k), name="ln_sum")
    return te.compute(rows, lambda *i: tirx.floordiv(total(*i) + _i64(n // 2), _i64(n)), name="ln_mean")


def _centered(x, mean, pre_shift, i):
    return _rshift_round(x(*i).astype("int64") - mean(*i[:-1]), pre_shift)


def ln_var_compute(x: te.Tensor, mean: te.Tensor, pre_shift: int) -> te.Tensor:
    """int64 per-row ``sum(c**2) * 2**16 // N`` of the centred, pre-shifted ``c``."""
    *rows, n = (int(d) for d in x.shape)
    k = te.reduce_axis((0, n), name="k")
    c = te.compute(x.shape, lambda *i: _centered(x, mean, pre_shift, i), name="ln_centered")
    var = te.compute(rows, lambda *i: te.sum(c[(*i, k)] * c[(*i, k)], axis=k), name="ln_var")
    return te.compute(rows, lambda *i: tirx.floordiv(var(*i) << _i64(VAR_BITS), _i64(n)), name="ln_var_scaled")


def ln_normalize_compute(x: te.Tensor, mean: te.Tensor, std: te.Tensor, gamma: te.Tensor, beta: te.Tensor,
                         pre_shift: int, out_shift: int) -> te.Tensor:
    """int32 ``round(((c * (2**46 // std)) >> 16) * gamma / 2**out_shift) + beta``."""
    rows = [int(d) for d in x.shape[:-1]]
    inv = te.compute(rows, lambda *i: tirx.floordiv(_i64(1 << INV_BITS), std(*i)), name="ln_inv")

    def body(*i):
        norm = (_centered(x, mean, pre_shift, i) * inv(*i[:-1])) >> _i64(NORM_DROP)
        return (_rshift_round(norm * gamma[i[-1]], out_shift) + beta[i[-1]]).astype("int32")

    return te.compute(x.shape, body, name="int_layer_norm")


def int_softmax_compute(x: te.Tensor, table: te.Tensor, mult: int, shift: int) -> te.Tensor:
    """TE of ``IntSoftmax`` over the last axis (see :func:`~qcompile.interpreter_integer_nn.int_softmax`)."""
    *rows, n = (int(d) for d in x.shape)
    size = int(table.shape[0])
    k = te.reduce_axis((0, n), name="k")
    top = te.compute(rows, lambda *i: te.max(x[(*i, k)], axis=k), name="sm_max")

    def exp_of(*i):
        d = te.min(top(*i[:-1]) - x(*i), _i32(DIFF_CAP))
        idx = tirx.q_multiply_shift_per_axis(d, _i32(mult), _i32(max(shift, 0)), _i32(max(-shift, 0)),
                                             tirx.IntImm("int32", 31), tirx.IntImm("bool", 1),
                                             tirx.IntImm("bool", 1))
        return table[te.min(idx, _i32(size - 1))]

    e = te.compute(x.shape, exp_of, name="sm_exp")
    k2 = te.reduce_axis((0, n), name="k2")
    total = te.compute(rows, lambda *i: te.sum(e[(*i, k2)], axis=k2), name="sm_sum")
    recip = te.compute(rows, lambda *i: tirx.floordiv(_i32(1 << 30), total(*i)), name="sm_recip")
    half = _i32(1 << (SOFTMAX_OUT_BITS - 1))
    return te.compute(x.shape, lambda *i: (e(*i) * recip(*i[:-1]) + half) >> _i32(SOFTMAX_OUT_BITS),
                      name="int_softmax")


def lut_compute(x: te.Tensor, table: te.Tensor, offset: int) -> te.Tensor:
    """TE of ``Lut``: ``table[clip(int32(x) + offset, 0, len - 1)]``."""
    size = int(table.shape[0])

    def body(*i):
        idx = x(*i).astype("int32") + _i32(offset)
        return table[te.max(te.min(idx, _i32(size - 1)), _i32(0))]

    return te.compute(x.shape, body, name="lut")


def row_shift_compute(x: te.Tensor, max_shift: int) -> te.Tensor:
    """TE of the exponent r [..., 1] of ``IntRowQuantize``'s multiplier ``2**r`` (see
    :func:`~qcompile.interpreter_integer_nn.int_row_quantize`): r counts the powers ``2**j``,
    ``7 <= j < 7 + max_shift``, that the row's largest ``|x|`` reaches."""
    *rows, n = (int(d) for d in x.shape)
    k = te.reduce_axis((0, n), name="k")
    top = te.compute(rows, lambda *i: te.max(te.max(x[(*i, k)], -x[(*i, k)]), axis=k), name="row_absmax")

    def shift(*i):
        a = top(*i[:-1])
        r = _i32(0)
        for j in range(ROW_CODE_BITS, ROW_CODE_BITS + max_shift):
            r = r + (a >= _i32(1 << j)).astype("int32")
        return r

    return te.compute((*rows, 1), shift, name="row_shift")


def row_mult_compute(shift: te.Tensor) -> te.Tensor:
    """TE of ``IntRowQuantize``'s multiplier output ``2**r``."""
    return te.compute(shift.shape, lambda *i: _i32(1) << shift(*i), name="row_mult")


def row_codes_compute(x: te.Tensor, shift: te.Tensor) -> te.Tensor:
    """TE of ``IntRowQuantize``'s codes: ``clip((x + mult / 2) // mult, -127, 127) + 128`` (uint8)
    with ``mult = 2**r``, computed as an arithmetic shift ``(x + (mult >> 1)) >> r`` (floor
    division by a power of two; x86 has no vector integer division)."""

    def body(*i):
        r = shift(*i[:-1], 0)
        q = (x(*i) + ((_i32(1) << r) >> _i32(1))) >> r
        return (te.max(te.min(q, _i32(127)), _i32(-127)) + _i32(128)).astype("uint8")

    return te.compute(x.shape, body, name="row_codes")
