"""int8 GEMMs for aarch64: ``sdot`` (ARMv8.2 dotprod) and ``smmla`` (ARMv8.6 i8mm).

Used by the W8A8 / integer-only linear layers through :mod:`qcompile.backends.int8_gemm`
(:func:`codes_matmul`), and standalone (:func:`int8_gemm_kernel`). Kernels follow the
:func:`qcompile.backends.kernels._finish` conventions (scheduled, ``tirx.is_scheduled``, no
``global_symbol``); schedules are in :mod:`qcompile.schedules.arm`.

Layouts (packed at compile time, numpy):

* sdot: weights ``int8[N/4, K/4, 4, 4]``, ``w[k, n]`` at ``[n // 4, k // 4, n % 4, k % 4]``
  (:func:`pack_sdot`); activations ``int8[M, K]``. Needs K % 4 == 0, N % 4 == 0.
* smmla: weights ``int8[N/2, K/8, 2, 8]``, ``w[k, n]`` at ``[n // 2, k // 8, n % 2, k % 8]``
  (:func:`pack_smmla`); activations packed likewise ``[M/2, K/8, 2, 8]`` inside the kernel.
  Needs M % 2 == 0, K % 8 == 0, N % 2 == 0.

Activations of the model paths are uint8 codes with zero point 128; both instructions are
s8 x s8, so the kernel first flips them, ``a = int8(u XOR 0x80) == u - 128`` exactly, and the
int32 sum is already zero-point corrected (no ``128 * sum_k w`` term). Accumulation is exact
for K < 2**17 (|a * w| <= 2**14).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx

from qcompile.schedules import arm as sched_arm

from ..kernels import _check_dims, _finish

__all__ = ["int8_gemm_kernel", "codes_matmul", "pack_sdot", "pack_smmla", "sdot_supported",
           "smmla_supported"]


def _aarch64_feature(target, feature: str) -> bool:
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64")):
        return False
    return bool(target.attrs.get(f"feature.{feature}", False))


def sdot_supported(target) -> bool:
    """True when ``target`` is aarch64 llvm with the dot-product extension."""
    return _aarch64_feature(target, "has_dotprod")


def smmla_supported(target) -> bool:
    """True when ``target`` is aarch64 llvm with the int8 matrix-multiply extension (i8mm)."""
    return _aarch64_feature(target, "has_matmul_i8")


def _pack(w: np.ndarray, cols: int, depth: int, name: str) -> np.ndarray:
    k, n = w.shape
    if k % depth or n % cols:
        raise ValueError(f"{name} needs K % {depth} == 0 and N % {cols} == 0 (K={k}, N={n})")
    w = np.asarray(w, np.int8).reshape(k // depth, depth, n // cols, cols)
    return np.ascontiguousarray(w.transpose(2, 0, 3, 1))


def pack_sdot(w: np.ndarray) -> np.ndarray:
    """int8 ``w[K, N]`` -> ``[N/4, K/4, 4, 4]`` with ``w[k, n]`` at ``[n // 4, k // 4, n % 4, k % 4]``."""
    return _pack(w, 4, 4, "pack_sdot")


def pack_smmla(w: np.ndarray) -> np.ndarray:
    """int8 ``w[K, N]`` -> ``[N/2, K/8, 2, 8]`` with ``w[k, n]`` at ``[n // 2, k // 8, n % 2, k % 8]``."""
    return _pack(w, 2, 8, "pack_smmla")


def _flip(code):
    """uint8 code (zero point 128) -> int8 value: ``u XOR 0x80`` reinterpreted."""
    return tirx.reinterpret("int8", tirx.bitwise_xor(code, tirx.const(128, "uint8")))


def _sdot_matmul(a: te.Tensor, m: int, k: int, n: int):
    w = te.placeholder((n // 4, k // 4, 4, 4), "int8", name="w")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(a[i, r].astype("int32") * w[j // 4, r // 4, j % 4, r % 4].astype("int32"), axis=r),
        name="matmul")
    return w, acc


def _smmla_matmul(u: te.Tensor, m: int, k: int, n: int):
    ap = te.compute((m // 2, k // 8, 2, 8), lambda i, r, ti, tr: _flip(u[i * 2 + ti, r * 8 + tr]), name="flip")
    w = te.placeholder((n // 2, k // 8, 2, 8), "int8", name="w")
    r = te.reduce_axis((0, k), name="r")
    tiles = te.compute(
        (m // 2, n // 2, 2, 2),
        lambda i, j, ti, tj: te.sum(ap[i, r // 8, ti, r % 8].astype("int32") * w[j, r // 8, tj, r % 8].astype("int32"),
                                    axis=r),
        name="matmul")
    acc = te.compute((m, n), lambda i, j: tiles[i // 2, j // 2, i % 2, j % 2], name="acc")
    return w, acc


def codes_matmul(m: int, k: int, n: int, kind: str):
    """TE ``acc[m, n] = sum_k (u[m, k] - 128) * w[k, n]`` (int32) on uint8 codes ``u``.

    ``kind`` "sdot" or "smmla" picks the weight layout and the block structure that
    :func:`qcompile.schedules.arm.schedule_sdot_codes_gemm` / ``schedule_smmla_gemm`` expect.
    Returns (u, w, acc) like :func:`qcompile.backends.int8_kernels.u8s8_matmul`.
    """
    _check_dims(m=m, k=k, n=n)
    u = te.placeholder((m, k), "uint8", name="u")
    if kind == "sdot":
        if k % 4 or n % 4:
            raise ValueError(f"the sdot GEMM needs K % 4 == 0 and N % 4 == 0 (K={k}, N={n})")
        w, acc = _sdot_matmul(te.compute((m, k), lambda i, r: _flip(u[i, r]), name="flip"), m, k, n)
    elif kind == "smmla":
        if m % 2 or k % 8 or n % 2:
            raise ValueError(f"the smmla GEMM needs M % 2 == 0, K % 8 == 0 and N % 2 == 0 (M={m}, K={k}, N={n})")
        w, acc = _smmla_matmul(u, m, k, n)
    else:
        raise ValueError(f"unknown aarch64 int8 GEMM kind '{kind}' (sdot, smmla)")
    return u, w, acc


def int8_gemm_kernel(m: int, k: int, n: int, target) -> tirx.PrimFunc:
    """c[m, n] (int32) = a[m, k] (int8) @ w[k, n] (int8, packed for sdot): standalone sdot GEMM."""
    _check_dims(m=m, k=k, n=n)
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if k % 4 or n % 4:
        raise ValueError(f"the sdot GEMM needs K % 4 == 0 and N % 4 == 0 (K={k}, N={n})")
    if not sdot_supported(target):
        raise ValueError("the sdot GEMM needs an aarch64 llvm target with +dotprod")
    a = te.placeholder((m, k), "int8", name="a")
    b, acc = _sdot_matmul(a, m, k, n)
    c = te.compute((m, n), lambda i, j: acc[i, j], name="epilogue")
    return _finish([a, b, c], target, lambda sch, _p: sched_arm.schedule_sdot_gemm(sch, "matmul", "epilogue", m, n))
