"""Hand schedules for the ARM (aarch64) kernels of ``qcompile.backends.arm64``. No graph rewrites.

sdot GEMM (:func:`schedule_sdot_gemm`): the int32 reduction block ``matmul`` (loops i, j, r)
over int8 activations ``a[m, k]`` and int8 weights packed ``[N/4, K/4, 4, 4]`` (element
``w[k, n]`` at ``[n // 4, k // 4, n % 4, k % 4]``) is tiled into ``mr`` rows x ``nv``
4-lane column vectors, loop order ``column panel, row block, k/4, mr (unrolled), nv
(unrolled), [4 x 4 tensorized]``. Each 4x4 inner block is one ``sdot v.4s, v.16b, v.4b[0]``-class
instruction: the four activation bytes are broadcast to all lanes and dotted with 16 weight
bytes (four columns x four k). The ``mr x 4*nv`` int32 accumulator lives in registers
("local"), which TVM's shipped ``ARM_DOT_4x4_i8_SDOT_INTRIN`` cannot tensorize (its C buffer
is global), so :data:`SDOT_INTRIN` is the same computation with a local accumulator.
Column panels and row blocks are fused and run in parallel. Needs ``+dotprod``.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

__all__ = ["SDOT_INTRIN", "schedule_sdot_gemm"]

SDOT_INTRIN = "qcompile_dot_4x4_i8i8s32_sdot_local"
MAX_ROWS = 4      # mr: rows per register tile
MAX_VECTORS = 4   # nv: 4-lane int32 accumulators per row (mr * nv = 16 of the 32 NEON registers)


@T.prim_func(s_tir=True)
def _sdot_desc(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for i in T.serial(0, 4):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _sdot_impl(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
        a_i8x16 = T.reinterpret(T.broadcast(a_i32, 4), dtype="int8x16")
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"), a_i8x16, B.vload([0, 0], dtype="int8x16"), dtype="int32x4",
        )


TensorIntrin.register(SDOT_INTRIN, _sdot_desc, _sdot_impl, override=True)


def _largest_divisor(value: int, cap: int) -> int:
    return next(d for d in range(min(cap, value), 0, -1) if value % d == 0)


def schedule_sdot_gemm(sch, block: str, epilogue: str, m: int, n: int) -> None:
    """Tile and tensorize the packed s8 x s8 GEMM (see the module docstring); n % 4 == 0, k % 4 == 0."""
    mr = _largest_divisor(m, MAX_ROWS)
    nv = _largest_divisor(n // 4, MAX_VECTORS)
    mm = sch.get_sblock(block)
    i, j, r = sch.get_loops(mm)
    io, ii = sch.split(i, [None, mr])
    jo, jv, ji = sch.split(j, [None, nv, 4])
    ro, ri = sch.split(r, [None, 4])
    sch.reorder(jo, io, ro, ii, jv, ji, ri)
    epi = sch.get_sblock(epilogue)
    sch.reverse_compute_at(epi, io)
    sch.set_scope(mm, 0, "local")
    sch.parallel(sch.fuse(jo, io))
    init = sch.decompose_reduction(mm, ro)
    sch.tensorize(ji, SDOT_INTRIN)
    sch.unroll(ii)
    sch.unroll(jv)
    *_, row, vec, lane = sch.get_loops(init)
    sch.unroll(row)
    sch.unroll(vec)
    sch.vectorize(lane)
    *_, row, col = sch.get_loops(epi)
    sch.unroll(row)
    co, cv = sch.split(col, [None, 4])
    sch.vectorize(cv)
    sch.unroll(co)
