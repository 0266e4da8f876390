"""TIR kernels of float LayerNorm, Softmax and Erf with onnxruntime's rounding, bit for bit.

The arithmetic, step by step, is :mod:`qcompile.mlas_float` (the interpreter's kernels); this
module writes the same steps in float32 with the same instructions: ``fma`` is the fused
multiply-add intrinsic (one rounding, ``vfmadd`` / ``fmadd``), everything else is a float32
operation rounded on its own. Two LLVM freedoms would break that and are fenced off with
``llvm.arithmetic.fence`` (free at run time): TVM builds with ``AllowFPOpFusion = Fast``, which
would fuse a product into a following add, and the host target's ``fast-math-reassoc``, which
would reorder the lane sums. The lanes of MLAS's vector accumulators are vectorised loops here,
so these kernels vectorise the way onnxruntime's do; rows run in parallel. The same code
serves every CPU (x86 and aarch64 alike). ``erf_compute`` is elementwise TE (fusable with its
neighbours).
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

from qcompile.mlas_float import ERF_CONSTANTS, EXP_CONSTANTS, LN_LANES, SOFTMAX_LANES

__all__ = ["layer_norm_kernel", "softmax_kernel", "erf_compute", "fence", "LN_LANES"]

_F32_LOWEST = -3.4028234663852886e38


def fence(v, dtype: str = "float32"):
    """``v`` as computed: never fused into an fma, never reassociated with its neighbours."""
    return tirx.call_llvm_pure_intrin(dtype, "llvm.arithmetic.fence", v)


def _add(a, b):
    return fence(a + b)


def _mul(a, b):
    return fence(a * b)


def _fma(a, b, c):
    return tirx.op.fma(a, b, c)


def _c(value) -> tirx.PrimExpr:
    return T.float32(float(value))


def layer_norm_kernel(rows: int, n: int, epsilon: float, target=None) -> tirx.PrimFunc:
    """PrimFunc(x f32 [rows, n], gamma f32 [n], beta f32 [n]) -> y f32 [rows, n]; ``n >= 8``."""
    del target
    if n < LN_LANES:
        raise ValueError(f"layer_norm_kernel needs rows of at least {LN_LANES} elements, got {n}")
    blocks = n // LN_LANES
    body = blocks * LN_LANES
    quads = body + (n - body) // 4 * 4
    eps = _c(epsilon)

    @T.prim_func(private=True, check_well_formed=False)  # the root sblock (see below)
    def kernel(x: T.Buffer((rows, n), "float32"), gamma: T.Buffer((n,), "float32"),
               beta: T.Buffer((n,), "float32"), y: T.Buffer((rows, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):  # a root block, as Relax's pattern analyses expect
            # per-row scratch, allocated once: a buffer declared inside the parallel loop
            # becomes a workspace allocation per row (2 us each)
            totals = T.decl_buffer((rows,), "float64")
            scratch = T.decl_buffer((rows, LN_LANES + 2), "float32")
            for i in T.parallel(rows):
                lanes = T.decl_buffer((LN_LANES,), "float32", data=scratch.data, elem_offset=i * (LN_LANES + 2))
                stat = T.decl_buffer((2,), "float32", data=scratch.data, elem_offset=i * (LN_LANES + 2) + LN_LANES)
                totals[i] = T.float64(0)
                for k in range(n):
                    totals[i] = totals[i] + T.Cast("float64", x[i, k])
                stat[0] = T.Cast("float32", totals[i] / T.float64(n))  # mean, then 1/std
                for lane in T.vectorized(LN_LANES):
                    lanes[lane] = T.float32(0)
                for j in range(blocks):
                    for lane in T.vectorized(LN_LANES):  # no Let inside: expressions inline
                        lanes[lane] = fence(_fma(_add(x[i, j * LN_LANES + lane], -stat[0]),
                                                  _add(x[i, j * LN_LANES + lane], -stat[0]), lanes[lane]))
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
                    lanes[0] = fence(_fma(d, d, lanes[0]))
                stat[1] = fence(T.float32(1) / T.sqrt(_add(fence(lanes[0] / T.float32(n)), eps)))
                for j in range(blocks):
                    for lane in T.vectorized(LN_LANES):
                        y[i, j * LN_LANES + lane] = _fma(_mul(_add(x[i, j * LN_LANES + lane], -stat[0]), stat[1]),
                                                         gamma[j * LN_LANES + lane], beta[j * LN_LANES + lane])
                for k in range(body, n):
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
    # p * 2**k rounded once (vscalefps), also for the subnormal results of k < -126: the
    # float64 product is exact, its conversion to float32 the one rounding
    two_k = T.reinterpret("float64", T.shift_left(T.Cast("int64", k) + T.int64(1023), T.int64(52)))
    return T.Cast("float32", T.Cast("float64", p) * two_k)


def softmax_kernel(rows: int, n: int, target=None) -> tirx.PrimFunc:
    """PrimFunc(x f32 [rows, n]) -> y f32 [rows, n], softmax of each row."""
    del target
    blocks = n // SOFTMAX_LANES
    body = blocks * SOFTMAX_LANES

    @T.prim_func(private=True, check_well_formed=False)  # the root sblock (see below)
    def kernel(x: T.Buffer((rows, n), "float32"), y: T.Buffer((rows, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):  # a root block, as Relax's pattern analyses expect
            scratch = T.decl_buffer((rows, SOFTMAX_LANES + 2), "float32")  # once, not per row (see LN)
            for i in T.parallel(rows):
                lanes = T.decl_buffer((SOFTMAX_LANES,), "float32", data=scratch.data, elem_offset=i * (SOFTMAX_LANES + 2))
                stat = T.decl_buffer((2,), "float32", data=scratch.data,
                                     elem_offset=i * (SOFTMAX_LANES + 2) + SOFTMAX_LANES)  # -max, 1/sum
                for lane in T.vectorized(SOFTMAX_LANES):  # the row max, lane-wise (max is exact in any order)
                    lanes[lane] = T.float32(_F32_LOWEST)
                for j in range(blocks):
                    for lane in T.vectorized(SOFTMAX_LANES):
                        lanes[lane] = T.max(lanes[lane], x[i, j * SOFTMAX_LANES + lane])
                stat[0] = T.float32(_F32_LOWEST)
                for k in range(body, n):
                    stat[0] = T.max(stat[0], x[i, k])
                for lane in range(SOFTMAX_LANES):
                    stat[0] = T.max(stat[0], lanes[lane])
                stat[0] = -stat[0]
                for lane in T.vectorized(SOFTMAX_LANES):
                    lanes[lane] = T.float32(0)
                for j in range(blocks):
                    for lane in T.vectorized(SOFTMAX_LANES):  # no Let inside: expressions inline
                        y[i, j * SOFTMAX_LANES + lane] = _exp_shifted(_add(x[i, j * SOFTMAX_LANES + lane], stat[0]))
                    for lane in T.vectorized(SOFTMAX_LANES):
                        lanes[lane] = _add(lanes[lane], y[i, j * SOFTMAX_LANES + lane])
                for k in range(body, n):  # the masked last vector: lane k - body
                    y[i, k] = _exp_shifted(_add(x[i, k], stat[0]))
                    lanes[k - body] = _add(lanes[k - body], y[i, k])
                for lane in range(8):
                    lanes[lane] = _add(lanes[lane], lanes[lane + 8])
                for lane in range(4):
                    lanes[lane] = _add(lanes[2 * lane], lanes[2 * lane + 1])
                stat[1] = fence(T.float32(1) / _add(_add(lanes[0], lanes[1]), _add(lanes[2], lanes[3])))
                for j in range(blocks):
                    for lane in T.vectorized(SOFTMAX_LANES):
                        y[i, j * SOFTMAX_LANES + lane] = _mul(y[i, j * SOFTMAX_LANES + lane], stat[1])
                for k in range(body, n):
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
