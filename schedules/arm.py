"""Hand schedules for the ARM (aarch64) kernels of ``qcompile.backends.arm64``. No graph rewrites.

sdot GEMM (:func:`schedule_sdot_gemm`): int8 activations ``a[m, k]`` times int8 weights packed
``[N/4, K/4, 4, 4]`` (element ``w[k, n]`` at ``[n // 4, k // 4, n % 4, k % 4]``), int32
accumulate; each 4x4 inner block is one ``sdot v.4s, v.16b, v.4b[0]``-class instruction
(:data:`SDOT_INTRIN`). The tiling is :func:`qcompile.schedules.dot_gemm.schedule_dot_gemm`
with ``mr`` <= 4 rows x ``nv`` <= 4 vectors (16 of the 32 NEON registers). Needs ``+dotprod``.
"""

from __future__ import annotations

from .dot_gemm import largest_divisor, register_dot_intrin, schedule_dot_gemm

__all__ = ["SDOT_INTRIN", "schedule_sdot_gemm"]

SDOT_INTRIN = register_dot_intrin(
    "qcompile_dot_4x4_i8i8s32_sdot_local", lanes=4, a_dtype="int8",
    llvm_intrin="llvm.aarch64.neon.sdot.v4i32.v16i8",
)
MAX_ROWS = 4      # mr: rows per register tile
MAX_VECTORS = 4   # nv: 4-lane int32 accumulators per row


def schedule_sdot_gemm(sch, block: str, epilogue: str, m: int, n: int) -> None:
    """Tile and tensorize the packed s8 x s8 GEMM; n % 4 == 0, k % 4 == 0."""
    schedule_dot_gemm(sch, block, epilogue, mr=largest_divisor(m, MAX_ROWS),
                      nv=largest_divisor(n // 4, MAX_VECTORS), lanes=4, intrin=SDOT_INTRIN)
