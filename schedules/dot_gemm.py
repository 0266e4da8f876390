"""Register-tiled GEMM with a 4-deep integer dot-product instruction, shared by targets.

Both x86 AVX-512 VNNI (``vpdpbusd``: 16 int32 lanes, u8 x s8) and aarch64 dotprod
(``sdot``: 4 int32 lanes, s8 x s8) compute, per instruction, ``C[l] += sum_{k<4} A[k] *
B[l, k]`` for every lane ``l`` with ``A`` (four activation bytes) broadcast: one tensor
intrinsic shape, parameterised by lanes, activation dtype and LLVM intrinsic
(:func:`register_dot_intrin`). The reduction block ``matmul`` (loops i, j, r) over weights
packed ``[N/lanes, K/4, lanes, 4]`` is tiled into ``mr`` rows x ``nv`` lane-vectors with loop
order ``column panel, row block, k/4, mr (unrolled), nv (unrolled), [lanes x 4 tensorized]``
(:func:`schedule_dot_gemm`). The accumulator tile lives in registers ("local"; TVM's shipped
intrinsics declare it global, hence our own), column panels and row blocks run in parallel.
No graph rewrites live here.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

__all__ = ["register_dot_intrin", "schedule_dot_gemm", "largest_divisor",
           "register_mmla_intrin", "schedule_mmla_gemm"]


def register_dot_intrin(name: str, lanes: int, a_dtype: str, llvm_intrin: str) -> str:
    """Register ``C[lanes] += A[4] . B[lanes, 4]`` (int32 accumulate) as tensor intrinsic ``name``."""
    a_vec, b_vec, c_vec = f"{a_dtype}x{4 * lanes}", f"int8x{4 * lanes}", f"int32x{lanes}"

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_word = T.reinterpret(A.vload([0], f"{a_dtype}x4"), dtype="int32")
            a_bcast = T.reinterpret(T.broadcast(a_word, lanes), dtype=a_vec)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrin),
                C.vload([0], dtype=c_vec), a_bcast, B.vload([0, 0], dtype=b_vec), dtype=c_vec,
            )

    TensorIntrin.register(name, desc, impl, override=True)
    return name


def largest_divisor(value: int, cap: int) -> int:
    return next(d for d in range(min(cap, value), 0, -1) if value % d == 0)


def schedule_dot_gemm(sch, block: str, epilogue: str, *, mr: int, nv: int, lanes: int, intrin: str,
                      per_batch: bool = False):
    """Tile and tensorize the packed int8 GEMM (module docstring); the epilogue is computed per row
    block. Loops before (i, j, r) are batch loops: they join the parallel loop, or with
    ``per_batch`` are the only parallel loop (fused; returned, for stages computed per batch)."""
    mm = sch.get_sblock(block)
    *batch, i, j, r = sch.get_loops(mm)
    io, ii = sch.split(i, [None, mr])
    jo, jv, ji = sch.split(j, [None, nv, lanes])
    ro, ri = sch.split(r, [None, 4])
    sch.reorder(jo, io, ro, ii, jv, ji, ri)  # batch loops stay outermost
    parallel = batch if per_batch else (*batch, jo, io)
    init, epi = _tensorize_tiles(sch, mm, epilogue, (jo, io, ro, ii, jv, ji), intrin, parallel)
    *_, row, vec, lane = sch.get_loops(init)  # the init block keeps the (mr, nv, lanes) split
    sch.unroll(row)
    sch.unroll(vec)
    sch.vectorize(lane)
    *_, row, col = sch.get_loops(epi)
    sch.unroll(row)
    co, cv = sch.split(col, [None, lanes])
    sch.vectorize(cv)
    sch.unroll(co)
    return sch.get_loops(init)[0] if per_batch else None


def _tensorize_tiles(sch, mm, epilogue: str, loops, intrin: str, parallel=None):
    """Shared by both GEMM schedules: ``loops`` = (column panel, row block, k, mr, nv, intrinsic
    loop). Epilogue per row block, accumulator in registers, the ``parallel`` loops (default:
    panels x blocks) fused and parallel, the intrinsic tensorized, the register tile unrolled.
    Returns (init block, epilogue block)."""
    jo, io, ro, ii, jv, inner = loops
    epi = sch.get_sblock(epilogue)
    sch.reverse_compute_at(epi, io)
    sch.set_scope(mm, 0, "local")
    parallel = parallel or (jo, io)
    sch.parallel(sch.fuse(*parallel) if len(parallel) > 1 else parallel[0])
    init = sch.decompose_reduction(mm, ro)
    sch.tensorize(inner, intrin)
    sch.unroll(ii)
    sch.unroll(jv)
    return init, epi


# ---------------------------------------------------------------------------- matrix-multiply-accumulate
# aarch64 i8mm ``smmla`` (and any instruction of its shape) multiplies whole tiles instead of
# broadcasting activations: ``C[rows, cols] += A[rows, depth] . B[cols, depth]^T`` with every
# operand one contiguous register. The GEMM therefore works on tiled buffers: activations packed
# ``[M/rows, K/depth, rows, depth]``, weights ``[N/cols, K/depth, cols, depth]`` and the
# reduction block writes ``[M/rows, N/cols, rows, cols]`` (loops I, J, i, j, r), tiled into
# ``mr`` x ``nv`` intrinsic tiles with loop order ``column panel, row block, k/depth, mr
# (unrolled), nv (unrolled), [rows x cols x depth tensorized]`` (:func:`schedule_mmla_gemm`).


def register_mmla_intrin(name: str, rows: int, cols: int, depth: int, llvm_intrin: str) -> str:
    """Register ``C[rows, cols] += A[rows, depth] . B[cols, depth]^T`` (s8 x s8, int32) as ``name``."""
    a_vec, b_vec, c_vec = f"int8x{rows * depth}", f"int8x{cols * depth}", f"int32x{rows * cols}"

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((rows, depth), "int8", offset_factor=1),
        B: T.Buffer((cols, depth), "int8", offset_factor=1),
        C: T.Buffer((rows, cols), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols], A[0:rows, 0:depth], B[0:cols, 0:depth])
            T.writes(C[0:rows, 0:cols])
            for i in T.serial(0, rows):
                for j in T.serial(0, cols):
                    for k in T.serial(0, depth):
                        with T.sblock("update"):
                            vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                            C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(B[vj, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((rows, depth), "int8", offset_factor=1),
        B: T.Buffer((cols, depth), "int8", offset_factor=1),
        C: T.Buffer((rows, cols), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols], A[0:rows, 0:depth], B[0:cols, 0:depth])
            T.writes(C[0:rows, 0:cols])
            C[0, T.ramp(T.int32(0), 1, rows * cols)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrin),
                C.vload([0, 0], dtype=c_vec), A.vload([0, 0], dtype=a_vec), B.vload([0, 0], dtype=b_vec),
                dtype=c_vec,
            )

    TensorIntrin.register(name, desc, impl, override=True)
    return name


def schedule_mmla_gemm(sch, block: str, epilogue: str, *, mr: int, nv: int, depth: int, intrin: str) -> None:
    """Tile and tensorize the tiled GEMM block (loops I, J, i, j, r; see above); epilogue per row block."""
    mm = sch.get_sblock(block)
    rows, cols, ti, tj, r = sch.get_loops(mm)
    io, ii = sch.split(rows, [None, mr])
    jo, jv = sch.split(cols, [None, nv])
    ro, ri = sch.split(r, [None, depth])
    sch.reorder(jo, io, ro, ii, jv, ti, tj, ri)
    init, epi = _tensorize_tiles(sch, mm, epilogue, (jo, io, ro, ii, jv, ti), intrin)
    *_, row, vec, ti, tj = sch.get_loops(init)
    sch.unroll(row)
    sch.unroll(vec)
    sch.vectorize(sch.fuse(ti, tj))
    *_, row, col = sch.get_loops(epi)
    sch.unroll(row)
    sch.vectorize(col)
