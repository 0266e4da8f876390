"""Hand schedules for the int8 kernels of ``qcompile.backends.int8_kernels`` on CPUs (llvm).

No graph rewrites live here. Block names are part of the kernels' contract.

VNNI GEMM (:func:`schedule_vnni_gemm`): u8 activations times int8 weights packed
``[N/16, K/4, 16, 4]``, tiled by :func:`qcompile.schedules.dot_gemm.schedule_dot_gemm`; the
16x4 inner block becomes one ``vpdpbusd`` on a zmm accumulator (:data:`VNNI_INTRIN`: TVM's
shipped ``dot_16x4_vnni`` passes ``<16 x i32>`` operands that LLVM 22 rejects, ours
reinterprets them as ``<64 x i8>``).

Without VNNI, :func:`schedule_int_gemm` reuses the float GEMM tiling of
:mod:`qcompile.schedules.llvm` on int32 lanes (LLVM widens to vpmulld/vpmaddwd).
"""

from __future__ import annotations

from . import llvm as sched_llvm
from .dot_gemm import largest_divisor, register_dot_intrin, schedule_dot_gemm

__all__ = ["VNNI_INTRIN", "schedule_vnni_gemm", "schedule_int_gemm", "schedule_quantize_rows",
           "schedule_elementwise"]

VNNI_INTRIN = register_dot_intrin(
    "qcompile_dot_16x4_vnni", lanes=16, a_dtype="uint8", llvm_intrin="llvm.x86.avx512.vpdpbusd.512",
)


def schedule_vnni_gemm(sch, block: str, epilogue: str, m: int, n: int, params) -> None:
    """Tile and tensorize the packed u8 x s8 GEMM: up to 8 rows x 3 zmm vectors."""
    del params
    panels = n // 16
    nv = next(c for c in (3, 2, 1) if panels % c == 0)
    schedule_dot_gemm(sch, block, epilogue, mr=largest_divisor(m, 8), nv=nv, lanes=16, intrin=VNNI_INTRIN)


def schedule_int_gemm(sch, block: str, epilogue: str, m: int, n: int, params) -> None:
    """Portable int32-accumulating GEMM: the float register tiling on int32 lanes."""
    sched_llvm.schedule_gemm(sch, block, epilogue, m, n, params)


def schedule_quantize_rows(sch, m: int, k: int, lanes: int, params) -> None:
    """One parallel loop over rows (that of ``amax``); per row: the 16-lane partial absmax, its
    maximum, the inverse scale, the codes (vectorized) and the scale, so the row stays in L1."""
    vec = params.lanes if params.lanes > 1 and k % params.lanes == 0 else 1
    row = sch.get_loops(sch.get_sblock("amax"))[0]
    for name in ("inv", "quant", "scale"):
        sch.reverse_compute_at(sch.get_sblock(name), row)
    sch.compute_at(sch.get_sblock("part"), row)
    if vec > 1:
        _, cv = sch.split(sch.get_loops(sch.get_sblock("quant"))[-1], [None, vec])
        sch.vectorize(cv)
    if m > 1:
        sch.parallel(row)
    part = sch.get_sblock("part")
    if lanes > 1:
        l, ro = sch.get_loops(part)[-2:]
        sch.reorder(ro, l)
        sch.vectorize(l)
        init = sch.decompose_reduction(part, ro)
        sch.vectorize(sch.get_loops(init)[-1])


def schedule_elementwise(sch, block: str, m: int, k: int, params) -> None:
    """Rows in parallel, columns vectorized."""
    vec = params.lanes if params.lanes > 1 and k % params.lanes == 0 else 1
    row, col = sch.get_loops(sch.get_sblock(block))
    if vec > 1:
        _, cv = sch.split(col, [None, vec])
        sch.vectorize(cv)
    if m > 1:
        sch.parallel(row)
