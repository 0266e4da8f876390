"""Hand schedules for the int8 kernels of ``qcompile.backends.int8_kernels`` on CPUs (llvm).

No graph rewrites live here. Block names are part of the kernels' contract.

VNNI GEMM (:func:`schedule_vnni_gemm`): the reduction block ``matmul`` (loops i, j, r) over
u8 activations and int8 weights packed ``[N/16, K/4, 16, 4]`` is tiled into ``mr`` rows x
``nv`` 16-lane column vectors, with loop order ``column panel, row block, k/4, mr (unrolled),
nv (unrolled), [16 x 4 tensorized]``; the 16x4 inner block becomes one ``vpdpbusd`` on a zmm
accumulator (:data:`VNNI_INTRIN`, registered here: TVM's shipped ``dot_16x4_vnni`` passes
``<16 x i32>`` operands that LLVM 22 rejects, so ours reinterprets them as ``<64 x i8>``).
The accumulator tile lives in registers ("local"), the u8 activation word is broadcast.
Column panels and row blocks are fused and run in parallel.

Without VNNI, :func:`schedule_int_gemm` reuses the float GEMM tiling of
:mod:`qcompile.schedules.llvm` on int32 lanes (LLVM widens to vpmulld/vpmaddwd).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from . import llvm as sched_llvm

__all__ = ["VNNI_INTRIN", "schedule_vnni_gemm", "schedule_int_gemm", "schedule_quantize_rows",
           "schedule_elementwise"]

VNNI_INTRIN = "qcompile_dot_16x4_vnni"


@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
        b_i8x64 = B.vload([0, 0], dtype="int8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"), a_u8x64, b_i8x64, dtype="int32x16",
        )


TensorIntrin.register(VNNI_INTRIN, _dot_16x4_desc, _dot_16x4_vnni, override=True)


def _row_tile(m: int, cap: int = 8) -> int:
    return next(r for r in range(min(cap, m), 0, -1) if m % r == 0)


def schedule_vnni_gemm(sch, block: str, epilogue: str, m: int, n: int, params) -> None:
    """Tile and tensorize the packed u8 x s8 GEMM (see the module docstring)."""
    del params
    panels = n // 16
    nv = next(c for c in (3, 2, 1) if panels % c == 0)
    mr = _row_tile(m)
    mm = sch.get_sblock(block)
    i, j, r = sch.get_loops(mm)
    io, ii = sch.split(i, [None, mr])
    jo, jv, ji = sch.split(j, [None, nv, 16])
    ro, ri = sch.split(r, [None, 4])
    sch.reorder(jo, io, ro, ii, jv, ji, ri)
    epi = sch.get_sblock(epilogue)
    sch.reverse_compute_at(epi, io)
    sch.set_scope(mm, 0, "local")
    sch.parallel(sch.fuse(jo, io))
    init = sch.decompose_reduction(mm, ro)
    sch.tensorize(ji, VNNI_INTRIN)
    sch.unroll(ii)
    sch.unroll(jv)
    *_, row, vec, lane = sch.get_loops(init)  # the init block keeps the (mr, nv, 16) split
    sch.unroll(row)
    sch.unroll(vec)
    sch.vectorize(lane)
    *_, row, col = sch.get_loops(epi)
    sch.unroll(row)
    co, cv = sch.split(col, [None, 16])
    sch.vectorize(cv)
    sch.unroll(co)


def schedule_int_gemm(sch, block: str, epilogue: str, m: int, n: int, params) -> None:
    """Portable int32-accumulating GEMM: the float register tiling on int32 lanes."""
    sched_llvm.schedule_gemm(sch, block, epilogue, m, n, params)


def schedule_quantize_rows(sch, m: int, k: int, lanes: int, params) -> None:
    """Per-row absmax (16-lane partial maxima, rows parallel), then the codes (rows parallel, vectorized)."""
    vec = params.lanes if params.lanes > 1 and k % params.lanes == 0 else 1
    quant = sch.get_sblock("quant")
    row, col = sch.get_loops(quant)
    if vec > 1:
        _, cv = sch.split(col, [None, vec])
        sch.vectorize(cv)
    if m > 1:
        sch.parallel(row)
    part = sch.get_sblock("part")
    prow, l, ro = sch.get_loops(part)
    if m > 1:
        sch.parallel(prow)  # before decompose_reduction (else "no compact dataflow")
    if lanes > 1:
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
