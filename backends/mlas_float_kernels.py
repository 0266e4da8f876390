"""TIR kernels of float LayerNorm and Softmax with onnxruntime's rounding, bit for bit.

The arithmetic, step by step, is :mod:`qcompile.mlas_float` (the interpreter's kernels); this
module writes the same steps as loops. Every float32 operation is computed in float64 and
rounded back to float32 (as in :mod:`.qoperator_kernels`): float64 carries more than
2 * 24 + 2 bits, so each add, multiply, divide and square root rounds exactly as the float32
one, a float32 ``fma`` is ``float32(float64(a) * b + c)`` as in the interpreter, and the
rounding after each step pins the accumulation order, which the host target's
``fast-math-reassoc`` could otherwise change. One row per parallel iteration; scalar code
(the same on every CPU, x86 and aarch64 alike). ``erf_compute`` is elementwise TE (fusable
with its neighbours), its steps pinned the same way.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

from qcompile.mlas_float import ERF_CONSTANTS, EXP_CONSTANTS, LN_LANES, SOFTMAX_LANES  # noqa: F401 (LN_LANES)

__all__ = ["layer_norm_kernel", "softmax_kernel", "erf_compute"]

_F32_LOWEST = -3.4028234663852886e38


def _f64(v):
    return T.Cast("float64", v)


def _f32(v):
    return T.Cast("float32", v)


def _add(a, b):
    return _f32(_f64(a) + _f64(b))


def _mul(a, b):
    """A float32 product rounded on its own: LLVM shrinks the float64 form back to a float32
    multiply, which an add could then absorb into an fma; the fence forbids that."""
    return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", _f32(_f64(a) * _f64(b)))


def _div(a, b):
    return _f32(_f64(a) / _f64(b))


def _fma(a, b, c):
    return _f32(_f64(a) * _f64(b) + _f64(c))


def _c(value) -> tirx.PrimExpr:
    return T.float32(float(value))


def layer_norm_kernel(rows: int, n: int, epsilon: float, target=None) -> tirx.PrimFunc:
    """PrimFunc(x f32 [rows, n], gamma f32 [n], beta f32 [n]) -> y f32 [rows, n]; ``n >= 8``."""
    del target
    if n < LN_LANES:
        raise ValueError(f"layer_norm_kernel needs rows of at least {LN_LANES} elements, got {n}")
    body = n - n % LN_LANES
    quads = body + (n - body) // 4 * 4
    eps = _c(epsilon)

    @T.prim_func(private=True, check_well_formed=False)  # the root sblock (see below)
    def kernel(x: T.Buffer((rows, n), "float32"), gamma: T.Buffer((n,), "float32"),
               beta: T.Buffer((n,), "float32"), y: T.Buffer((rows, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):  # a root block, as Relax's pattern analyses expect
            for i in T.parallel(rows):
                total = T.decl_buffer((1,), "float64", scope="local")
                lanes = T.decl_buffer((LN_LANES,), "float32", scope="local")
                stat = T.decl_buffer((2,), "float32", scope="local")  # mean, 1/std
                total[0] = T.float64(0)
                for k in range(n):
                    total[0] = total[0] + _f64(x[i, k])
                stat[0] = _f32(total[0] / T.float64(n))
                for lane in range(LN_LANES):
                    lanes[lane] = T.float32(0)
                for j in range(body // LN_LANES):
                    for lane in range(LN_LANES):
                        d = _add(x[i, j * LN_LANES + lane], -stat[0])
                        lanes[lane] = _fma(d, d, lanes[lane])
                for lane in range(4):
                    lanes[lane] = _add(lanes[lane], lanes[lane + 4])
                for lane in range(2):
                    lanes[lane] = _add(lanes[lane], lanes[lane + 2])
                lanes[0] = _add(lanes[0], lanes[1])
                for k in range(body, quads):
                    d = _add(x[i, k], -stat[0])
                    lanes[0] = _add(lanes[0], _mul(d, d))
                for k in range(quads, n):
                    d = _add(x[i, k], -stat[0])
                    lanes[0] = _fma(d, d, lanes[0])
                stat[1] = _div(T.float32(1), _f32(T.sqrt(_f64(_add(_div(lanes[0], T.float32(n)), eps)))))
                for k in range(n):
                    y[i, k] = _fma(_mul(_add(x[i, k], -stat[0]), stat[1]), gamma[k], beta[k])

    return kernel.with_attr("tirx.is_scheduled", True)


def _exp_shifted(v):
    """MLAS's exp of a shifted float32 value (see :func:`qcompile.mlas_float.exp_shifted`)."""
    c = EXP_CONSTANTS
    v = T.max(_c(c["lower_range"]), v)
    k = _add(_fma(v, _c(c["log2_reciprocal"]), _c(c["rounding_bias"])), -_c(c["rounding_bias"]))
    r = _fma(k, _c(c["log2_high"]), v)
    r = _fma(k, _c(c["log2_low"]), r)
    p = _c(c["poly"][0])
    for coeff in c["poly"][1:]:
        p = _fma(p, r, _c(coeff))
    two_k = T.reinterpret("float64", T.shift_left(T.Cast("int64", k) + T.int64(1023), T.int64(52)))
    return _f32(_f64(p) * two_k)


def softmax_kernel(rows: int, n: int, target=None) -> tirx.PrimFunc:
    """PrimFunc(x f32 [rows, n]) -> y f32 [rows, n], softmax of each row."""
    del target

    @T.prim_func(private=True, check_well_formed=False)  # the root sblock (see below)
    def kernel(x: T.Buffer((rows, n), "float32"), y: T.Buffer((rows, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):  # a root block, as Relax's pattern analyses expect
            for i in T.parallel(rows):
                lanes = T.decl_buffer((SOFTMAX_LANES,), "float32", scope="local")
                stat = T.decl_buffer((2,), "float32", scope="local")  # -max, 1/sum
                stat[0] = T.float32(_F32_LOWEST)
                for k in range(n):
                    stat[0] = T.max(stat[0], x[i, k])
                stat[0] = -stat[0]
                for lane in range(SOFTMAX_LANES):
                    lanes[lane] = T.float32(0)
                for k in range(n):
                    y[i, k] = _exp_shifted(_add(x[i, k], stat[0]))
                    lanes[k % SOFTMAX_LANES] = _add(lanes[k % SOFTMAX_LANES], y[i, k])
                for lane in range(8):
                    lanes[lane] = _add(lanes[lane], lanes[lane + 8])
                for lane in range(4):
                    lanes[lane] = _add(lanes[2 * lane], lanes[2 * lane + 1])
                stat[1] = _div(T.float32(1), _add(_add(lanes[0], lanes[1]), _add(lanes[2], lanes[3])))
                for k in range(n):
                    y[i, k] = _mul(y[i, k], stat[1])

    return kernel.with_attr("tirx.is_scheduled", True)


def erf_compute(x: te.Tensor) -> te.Tensor:
    """Elementwise MLAS erf of float32 ``x`` (see :func:`qcompile.mlas_float.erf`)."""
    c = ERF_CONSTANTS

    def body(*idx):
        v = x(*idx)
        negative = T.reinterpret("int32", v) < 0  # the sign bit: erf(-0.0) is -0.0
        a = T.min(T.abs(v), _c(c["upper_abs"]))
        square = _mul(a, a)
        p = _c(c["small"][0])
        for coeff in c["small"][1:]:
            p = _fma(p, square, _c(coeff))
        p = _fma(p, a, a)
        q = _c(c["big"][0])
        for coeff in c["big"][1:]:
            q = _fma(q, a, _c(coeff))
        q = T.max(-_fma(q, a, a), _c(c["exp_lower"]))
        k = _add(_fma(_c(EXP_CONSTANTS["log2_reciprocal"]), q, _c(c["exp_rounding"])), -_c(c["exp_rounding"]))
        f = _fma(k, _c(EXP_CONSTANTS["log2_high"]), q)
        f = _fma(k, _c(EXP_CONSTANTS["log2_low"]), f)
        e = _c(c["exp_poly"][0])
        for coeff in c["exp_poly"][1:]:
            e = _fma(e, f, _c(coeff))
        two_k = T.reinterpret("float32", T.shift_left(T.Cast("int32", k) + 127, 23))
        big = _add(T.float32(1), -_mul(e, two_k))
        r = T.Select(a >= _c(c["split"]), big, p)
        return T.Select(negative, -r, r)

    return te.compute(x.shape, body, name="mlas_erf")
