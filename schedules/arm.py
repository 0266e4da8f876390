"""Hand schedules for the ARM (aarch64) kernels of ``qcompile.backends.arm64``. No graph rewrites.

sdot GEMM (:func:`schedule_sdot_gemm`): int8 activations ``a[m, k]`` times int8 weights packed
``[N/4, K/4, 4, 4]`` (element ``w[k, n]`` at ``[n // 4, k // 4, n % 4, k % 4]``), int32
accumulate; each 4x4 inner block is one ``sdot v.4s, v.16b, v.4b[0]``-class instruction
(:data:`SDOT_INTRIN`). The tiling is :func:`qcompile.schedules.dot_gemm.schedule_dot_gemm`
with ``mr`` <= 4 rows x ``nv`` <= 4 vectors (16 of the 32 NEON registers). Needs ``+dotprod``.

smmla GEMM (:func:`schedule_smmla_gemm`): int8 activations packed ``[M/2, K/8, 2, 8]`` times
weights packed ``[N/2, K/8, 2, 8]`` into int32 tiles ``[M/2, N/2, 2, 2]``; each tile step is one
``smmla v.4s, v.16b, v.16b`` (:data:`SMMLA_INTRIN`, 2x8 by 8x2). The tiling is
:func:`qcompile.schedules.dot_gemm.schedule_mmla_gemm` with ``mr`` <= 4 x ``nv`` <= 4 tiles
(8 x 8 outputs: 16 accumulators + 8 operand registers). Needs ``+i8mm``.

Both read activations from a ``flip`` block that turns the uint8 codes (zero point 128) into
int8 (``u XOR 0x80 == u - 128``) once per GEMM (:func:`schedule_flip`): rows in parallel,
vectorized.
"""

from __future__ import annotations

from .dot_gemm import (largest_divisor, register_dot_intrin, register_mmla_intrin, schedule_dot_gemm,
                       schedule_mmla_gemm)

__all__ = ["SDOT_INTRIN", "SMMLA_INTRIN", "schedule_sdot_gemm", "schedule_smmla_gemm", "schedule_flip",
           "schedule_sdot_codes_gemm"]

SDOT_INTRIN = register_dot_intrin(
    "qcompile_dot_4x4_i8i8s32_sdot_local", lanes=4, a_dtype="int8",
    llvm_intrin="llvm.aarch64.neon.sdot.v4i32.v16i8",
)
MAX_ROWS = 4      # mr: rows per register tile
MAX_VECTORS = 4   # nv: 4-lane int32 accumulators per row
SMMLA_INTRIN = register_mmla_intrin(
    "qcompile_mmla_2x2x8_i8i8s32_smmla_local", rows=2, cols=2, depth=8,
    llvm_intrin="llvm.aarch64.neon.smmla.v4i32.v16i8",
)
MAX_TILES = 4     # smmla: mr and nv, in 2 x 2 tiles


def schedule_sdot_gemm(sch, block: str, epilogue: str, m: int, n: int) -> None:
    """Tile and tensorize the packed s8 x s8 GEMM; n % 4 == 0, k % 4 == 0."""
    schedule_dot_gemm(sch, block, epilogue, mr=largest_divisor(m, MAX_ROWS),
                      nv=largest_divisor(n // 4, MAX_VECTORS), lanes=4, intrin=SDOT_INTRIN)


def schedule_flip(sch, block: str = "flip") -> None:
    """The code -> int8 block: outer loop parallel, innermost loop vectorized (as far as 16 lanes)."""
    loops = sch.get_loops(sch.get_sblock(block))
    sch.parallel(loops[0])
    inner = loops[-1]
    lanes = largest_divisor(int(sch.get(inner).extent), 16)
    if lanes > 1:
        sch.vectorize(sch.split(inner, [None, lanes])[1])


def schedule_sdot_codes_gemm(sch, block: str, epilogue: str, m: int, n: int, params=None) -> None:
    """The sdot GEMM on uint8 codes: :func:`schedule_flip`, then :func:`schedule_sdot_gemm`."""
    del params
    schedule_flip(sch)
    schedule_sdot_gemm(sch, block, epilogue, m, n)


def schedule_smmla_gemm(sch, block: str, epilogue: str, m: int, n: int, params=None) -> None:
    """Tile and tensorize the tiled s8 x s8 GEMM (m % 2 == 0, n % 2 == 0, k % 8 == 0); the ``acc``
    block (tiles -> [m, n]) is inlined into the epilogue."""
    del params
    schedule_flip(sch)
    sch.compute_inline(sch.get_sblock("acc"))
    schedule_mmla_gemm(sch, block, epilogue, mr=largest_divisor(m // 2, MAX_TILES),
                       nv=largest_divisor(n // 2, MAX_TILES), depth=8, intrin=SMMLA_INTRIN)
