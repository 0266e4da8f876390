"""The one place that picks the int8 GEMM of ``Int8Linear`` / ``IntLinear`` for a target.

:func:`select` returns a kind, and everything else keys on it:

=========== ====================================== ================================ ============
kind        where (target, shape)                  weights (:func:`pack`)           activations
=========== ====================================== ================================ ============
``vnni``    x86 AVX-512 VNNI, K % 4, N % 16        ``[N/16, K/4, 16, 4]``           uint8 codes
``smmla``   aarch64 +i8mm, M % 2, K % 8, N % 2     ``[N/2, K/8, 2, 8]``             int8 (flip)
``sdot``    aarch64 +dotprod, K % 4, N % 4         ``[N/4, K/4, 4, 4]``             int8 (flip)
``portable`` anything else                         ``[K, N]``                       uint8 codes
=========== ====================================== ================================ ============

Invariant (all kinds): ``acc[i, j] - zero_point_correction(kind, w)[j] == sum_k (u[i, k] - 128)
* w[k, j]`` exactly, where ``acc`` is :func:`matmul`'s int32 block and ``u`` the uint8 codes:
the uint8 kinds carry ``128 * sum_k w`` in the epilogue constant, the flip kinds compute on
``u XOR 0x80 == u - 128`` and need no correction. Block names (``matmul``, ``epilogue``) are
the contract between :func:`matmul` and :func:`schedule`.
"""

from __future__ import annotations

import numpy as np

from . import int8_kernels  # module import: int8_kernels imports this module too

__all__ = ["KINDS", "select", "kind_of", "pack", "zero_point_correction", "matmul", "schedule"]

KINDS = ("vnni", "smmla", "sdot", "portable")
_FLIPPED = frozenset({"smmla", "sdot"})  # kinds that compute on int8 (u - 128)


def _arm():
    """:mod:`qcompile.backends.arm64.int8_gemm`, imported on first use: the ``arm64`` package
    imports the llvm backend, whose lowerings import this module."""
    from .arm64 import int8_gemm as arm_gemm

    return arm_gemm


def select(target, m: int, k: int, n: int) -> str:
    """The fastest int8 GEMM ``target`` has for an [m, k] x [k, n] product (see the table)."""
    if int8_kernels.vnni_supported(target) and k % 4 == 0 and n % 16 == 0:
        return "vnni"
    arm_gemm = _arm()
    if arm_gemm.smmla_supported(target) and m % 2 == 0 and k % 8 == 0 and n % 2 == 0:
        return "smmla"
    if arm_gemm.sdot_supported(target) and k % 4 == 0 and n % 4 == 0:
        return "sdot"
    return "portable"


def kind_of(gemm) -> str:
    """A kind from a kind, or from the older boolean ``vnni`` flag (True: "vnni", False: "portable")."""
    if isinstance(gemm, (bool, np.bool_)):
        return "vnni" if gemm else "portable"
    if gemm not in KINDS:
        raise ValueError(f"unknown int8 GEMM kind '{gemm}' (one of {', '.join(KINDS)})")
    return gemm


def pack(kind: str, w: np.ndarray) -> np.ndarray:
    """int8 ``w[K, N]`` in the layout the ``kind`` kernel reads."""
    kind = kind_of(kind)
    if kind in _FLIPPED:  # the arm64 packers only when asked for: importing them costs seconds
        return {"smmla": _arm().pack_smmla, "sdot": _arm().pack_sdot}[kind](w)
    return {"vnni": int8_kernels.pack_vnni, "portable": np.ascontiguousarray}[kind](w)


def zero_point_correction(kind: str, w: np.ndarray) -> np.ndarray:
    """int64[N] to subtract from the ``kind`` GEMM's accumulator (module invariant)."""
    if kind_of(kind) in _FLIPPED:
        return np.zeros(w.shape[1], np.int64)
    return 128 * w.astype(np.int64).sum(axis=0)


def matmul(m: int, k: int, n: int, kind: str):
    """TE (u uint8[m, k], w in :func:`pack` layout, int32 ``acc[m, n]``) of the ``kind`` GEMM."""
    kind = kind_of(kind)
    if kind in _FLIPPED:
        return _arm().codes_matmul(m, k, n, kind)
    return int8_kernels.u8s8_matmul(m, k, n, kind == "vnni")


def schedule(kind: str):
    """The schedule ``(sch, block, epilogue, m, n, params)`` of the ``kind`` GEMM."""
    # the schedule modules are imported on first use: registering their tensor intrinsics parses
    # TVMScript, about a second per module
    kind = kind_of(kind)
    if kind in _FLIPPED:
        from qcompile.schedules import arm as sched_arm

        return {"smmla": sched_arm.schedule_smmla_gemm, "sdot": sched_arm.schedule_sdot_codes_gemm}[kind]
    from qcompile.schedules import llvm_int8 as sched_llvm_int8

    return {"vnni": sched_llvm_int8.schedule_vnni_gemm, "portable": sched_llvm_int8.schedule_int_gemm}[kind]
