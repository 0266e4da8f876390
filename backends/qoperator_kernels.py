"""Hand-written TIR kernels of the QOperator ops whose float rounding order must be pinned,
and the int32 batched matrix product of two run-time operands.

``batch_matmul_int32_kernel``: ``c[t] = a[t] @ b[t]`` in int32, a kernel of its own (opaque to
FuseOps): fused with its requantization epilogue, the row-reduction schedule would recompute
the whole product once per output row.

``qlinear_softmax_kernel``: onnxruntime's ``QlinearSoftmaxCPU<uint8_t>`` over rows of ``d``
codes (reference: :func:`qcompile.interpreter_qoperator.qlinear_softmax`). Every float32
operation is computed in float64 and rounded back to float32: float64 carries more than
2 * 24 + 2 bits, so each add, multiply and divide rounds exactly as onnxruntime's float32 one,
and the rounding after every step pins the row sum's index order, which the host target's
``fast-math-reassoc`` could otherwise reassociate (vectorize).
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

__all__ = ["qlinear_softmax_kernel", "batch_matmul_int32_kernel"]


def batch_matmul_int32_kernel(batch: int, m: int, k: int, n: int, target=None) -> tirx.PrimFunc:
    """PrimFunc(a int32 [batch, m, k], b int32 [batch, k, n]) -> c int32 [batch, m, n]."""
    a = te.placeholder((batch, m, k), "int32", name="a")
    b = te.placeholder((batch, k, n), "int32", name="b")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((batch, m, n), lambda t, i, j: te.sum(a[t, i, r] * b[t, r, j], axis=r), name="matmul_integer")
    func = te.create_prim_func([a, b, c])
    return func.without_attr("global_symbol") if func.attrs is not None and "global_symbol" in func.attrs else func


def qlinear_softmax_kernel(rows: int, d: int, y_multiplier: float, y_zero_point: int, target=None) -> tirx.PrimFunc:
    """PrimFunc(x uint8 [rows, d], table float32 [256]) -> y uint8 [rows, d]."""
    mult = float(y_multiplier)
    zp = float(y_zero_point)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((rows, d), "uint8"), table: T.Buffer((256,), "float32"), y: T.Buffer((rows, d), "uint8")):
        T.func_attr({"tirx.noalias": True})
        for i in T.parallel(rows):
            xmax = T.decl_buffer((1,), "int32", scope="local")
            total = T.decl_buffer((1,), "float32", scope="local")
            xmax[0] = 0
            for k in range(d):
                xmax[0] = T.max(xmax[0], T.Cast("int32", x[i, k]))
            total[0] = T.float32(0)
            for k in range(d):
                e = table[T.Cast("int32", x[i, k]) + 255 - xmax[0]]
                total[0] = T.Cast("float32", T.Cast("float64", total[0]) + T.Cast("float64", e))
            for k in range(d):
                e = table[T.Cast("int32", x[i, k]) + 255 - xmax[0]]
                scaled = T.Cast("float32", T.Cast("float64", e) * T.float64(mult))
                t = T.Cast("float32", T.Cast("float64", scaled) / T.Cast("float64", total[0]))
                code = T.min(T.round(t) + T.float32(zp), T.float32(255))  # LLVM's min drops a NaN: test t
                y[i, k] = T.Cast("uint8", T.if_then_else(T.isnan(t), T.float32(0), code))  # NaN -> 0, as onnxruntime

    return kernel.with_attr("tirx.is_scheduled", True)
