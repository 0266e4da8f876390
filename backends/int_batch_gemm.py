"""The batched integer GEMM of ``IntMatMul`` on 8-bit operands through x86 VNNI (``vpdpbusd``).

:func:`qcompile.backends.kernels.int_batch_matmul_kernel` computes, per batch ``t``, int32
``y = (a - a_zero) @ (b - b_zero)``. When a is uint8 and ``b - b_zero`` is exactly int8 (b
uint8 codes with zero point 128, or int8 with zero 0) -- attention's ``Q K^T`` on codes -- it is
built here (:func:`applies`) instead of the loop nest on operands widened to int32:

1. ``pack``: ``b - b_zero`` as int8 in the VNNI layout ``[batch, N/16, K/4, 16, 4]`` (for codes
   this is ``b XOR 0x80``).
2. ``lhs`` (when ``a_zero`` is not 0): a (uint8, used as is) plus one row of ones and zero rows
   up to a whole row block.
3. ``matmul``: u8 x s8 -> int32 by ``vpdpbusd``, tiled by
   :func:`qcompile.schedules.dot_gemm.schedule_dot_gemm`. The row of ones yields the column
   sums ``sum_k (b - b_zero)``.
4. ``epilogue``: ``acc[i, j] - a_zero * colsum[j]`` (a's zero point), exactly the reference's
   int32 result (sums fit: |y| <= 255 * 128 * K).

One batch per parallel iteration runs all four stages, so the packed operand and the
accumulators stay in cache. ``int32`` left operands (probabilities times ``V``) keep the widened
loop nest: without a bound on their range, splitting them into 8- or 16-bit digits costs as
many dot-product instructions as the int32 multiplies they replace (measured: equal times).
"""

from __future__ import annotations

from tvm import te, tirx

from qcompile.schedules.dot_gemm import largest_divisor, schedule_dot_gemm

from .int8_kernels import vnni_supported
from .kernels import _check_dims, _finish

__all__ = ["applies", "u8_batch_matmul_kernel"]

LANES = 16  # int32 lanes of one zmm accumulator
DEPTH = 4  # bytes per lane and vpdpbusd


def applies(target, k: int, n: int, a_dtype: str, b_dtype: str, b_zero: int) -> bool:
    """True when :func:`u8_batch_matmul_kernel` can build this product for ``target``."""
    int8_b = (b_dtype, b_zero) in {("uint8", 128), ("int8", 0)}  # b - b_zero is exactly an int8
    return a_dtype == "uint8" and int8_b and k % DEPTH == 0 and n % LANES == 0 and vnni_supported(target)


def u8_batch_matmul_kernel(batch: int, m: int, k: int, n: int, b_dtype: str, a_zero: int, b_zero: int,
                           target) -> tirx.PrimFunc:
    """Args: a uint8 [batch, m, k], b ``b_dtype`` [batch, k, n], y int32 [batch, m, n] (module docstring)."""
    _check_dims(batch=batch, m=m, k=k, n=n)
    if not applies(target, k, n, "uint8", b_dtype, b_zero):
        raise ValueError(f"no VNNI batch GEMM for uint8 x {b_dtype} (zero point {b_zero}), k={k}, n={n}")
    a = te.placeholder((batch, m, k), "uint8", name="a")
    b = te.placeholder((batch, k, n), b_dtype, name="b")
    packed = te.compute((batch, n // LANES, k // DEPTH, LANES, DEPTH), lambda t, jo, ro, jl, rl: (
        b[t, ro * DEPTH + rl, jo * LANES + jl].astype("int32") - tirx.const(b_zero, "int32")).astype("int8"),
        name="pack")
    mr = largest_divisor(m, 8)
    extra = mr if a_zero else 0  # rows after a's: the row of ones, then zeros to a whole block

    def lhs_at(t, i, r):
        ones = tirx.Select(i == m, tirx.const(1, "uint8"), tirx.const(0, "uint8"))
        return tirx.Select(i < m, a[t, te.min(i, m - 1), r], ones)

    lhs = te.compute((batch, m + extra, k), lhs_at, name="lhs") if extra else a
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((batch, m + extra, n), lambda t, i, j: te.sum(
        lhs[t, i, r].astype("int32") * packed[t, j // LANES, r // DEPTH, j % LANES, r % DEPTH].astype("int32"),
        axis=r), name="matmul")
    if extra:
        colcorr = te.compute((batch, n), lambda t, j: tirx.const(-a_zero, "int32") * acc[t, m, j], name="colcorr")
        y = te.compute((batch, m, n), lambda t, i, j: acc[t, i, j] + colcorr[t, j], name="epilogue")
    else:
        y = te.compute((batch, m, n), lambda t, i, j: acc[t, i, j], name="epilogue")
    return _finish([a, b, y], target, lambda sch, p: _schedule(sch, n, mr, bool(extra)))


def _schedule(sch, n: int, mr: int, corrected: bool) -> None:
    """One batch per parallel iteration: packing, left operand, GEMM tiles (written back by a
    cache block per row block), the correction row, the epilogue (vectorized)."""
    from qcompile.schedules import llvm_int8 as sched  # registers the intrinsic on first use

    mm = sch.get_sblock("matmul")
    store = sch.cache_write(mm, 0, "global")
    for name in ("pack", "lhs") if corrected else ("pack",):
        sch.compute_at(sch.get_sblock(name), sch.get_loops(mm)[0])
    panels = n // LANES
    batch_loop = schedule_dot_gemm(sch, "matmul", sch.get(store).name_hint, mr=mr, lanes=LANES,
                                   nv=next(c for c in (3, 2, 1) if panels % c == 0), intrin=sched.VNNI_INTRIN,
                                   per_batch=True)
    for name in ("colcorr", "epilogue") if corrected else ("epilogue",):
        block = sch.get_sblock(name)
        sch.reverse_compute_at(block, batch_loop)
        sch.vectorize(sch.split(sch.get_loops(block)[-1], [None, LANES])[1])
