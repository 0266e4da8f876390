"""TE kernels of the integer-only path: the int8 GEMM with an int32 epilogue, and the dyadic rescale.

Semantics are those of :mod:`qcompile.ops` (``IntLinear``, ``Requantize``) and of the reference
kernels in :mod:`qcompile.interpreter_integer`; the compiled kernels agree with them bit for bit.
No float appears anywhere in these kernels.

* :func:`int_linear_kernel` reuses the W8A8 GEMM (uint8 codes with zero point 128; the GEMM
  kind -- VNNI, sdot, smmla or portable -- and its packing come from
  :mod:`qcompile.backends.int8_gemm`); its epilogue adds one int32 vector ``bias'[n] = bias[n] -
  zero_point_correction[n]`` (folded at compile time), then runs the fused elementwise steps of
  :mod:`qcompile.backends.int_epilogue` (``Requantize``, ``Lut``) on the register tile and stores
  the last one (int32 without steps).
* :func:`requantize_compute` is the TE body of ``Requantize``: ``tirx.q_multiply_shift_per_axis``
  with q = 31 (int64 product, rounding shift), as ``topi.fixed_point_multiply_per_axis`` emits it.
"""

from __future__ import annotations

from tvm import te, tirx

from . import int8_gemm, int_epilogue
from .kernels import _finish

__all__ = ["int_linear_kernel", "requantize_compute"]


def int_linear_kernel(m: int, k: int, n: int, gemm, target, steps=(), row_mult: bool = False) -> tirx.PrimFunc:
    """y[m, n] = steps(sum_k u[m, k] * w[k, n] + bias[n]), int32 accumulation.

    With ``row_mult`` (codes of ``IntRowQuantize``): y[m, n] = steps((sum_k u[m, k] * w[k, n] +
    corr[n]) * row_mult[m, 0] + bias[n]), two more args after ``bias``: corr int32[n] (minus
    ``int8_gemm.zero_point_correction``; then ``bias`` is the layer's bias alone) and row_mult
    int32[m, 1].

    Args: u uint8[m, k], w int8 (packed for the :mod:`qcompile.backends.int8_gemm` kind
    ``gemm``; True / False: "vnni" / "portable"), bias int32[n] (already minus
    ``int8_gemm.zero_point_correction``), the constants of each
    :class:`~qcompile.backends.int_epilogue.EpilogueStep` in ``steps`` (in order), y[m, n]:
    int32 without steps, else the last step's dtype. The steps run on the register tile, in the
    epilogue block, and only ``y`` is stored.
    """
    u, w, acc = int8_gemm.matmul(m, k, n, gemm)
    bias = te.placeholder((n,), "int32", name="bias")
    rows = []
    if row_mult:  # the zero-point correction is scaled by the row's multiplier, the bias is not
        corr, mult = te.placeholder((n,), "int32", name="corr"), te.placeholder((m, 1), "int32", name="row_mult")
        rows = [corr, mult]
        y = te.compute((m, n), lambda i, j: (acc[i, j] + corr[j]) * mult[i, 0] + bias[j], name="epilogue")
    else:
        y = te.compute((m, n), lambda i, j: acc[i, j] + bias[j], name="epilogue")
    y, consts = int_epilogue.apply_steps(y, steps)
    schedule = int8_gemm.schedule(gemm)

    def fused_schedule(sch, params):
        schedule(sch, "matmul", int_epilogue.inline_chain(sch, "epilogue"), m, n, params)

    return _finish([u, w, bias, *rows, *consts, y], target, fused_schedule)


def requantize_compute(x: te.Tensor, mult: te.Tensor, shift: te.Tensor, axis: int, out_dtype: str,
                       qmin: int, qmax: int) -> te.Tensor:
    """TE: ``Requantize`` of int32 / uint8-code ``x`` with per-channel (along ``axis``) or scalar params."""
    per_channel = int(mult.shape[0]) > 1

    def body(*idx):
        v = x(*idx).astype("int32")
        if x.dtype == "uint8":
            v = v - tirx.const(128, "int32")
        c = idx[axis] if per_channel else 0
        s = shift[c]
        r = tirx.q_multiply_shift_per_axis(
            v, mult[c], te.max(s, tirx.const(0, "int32")), te.max(-s, tirx.const(0, "int32")),
            tirx.IntImm("int32", 31), tirx.IntImm("bool", 1), tirx.IntImm("bool", 1))
        if out_dtype == "int32":
            return r
        r = te.max(te.min(r, tirx.const(qmax, "int32")), tirx.const(qmin, "int32"))
        return (r + tirx.const(128, "int32")).astype("uint8")

    return te.compute(x.shape, body, name="requantize")
