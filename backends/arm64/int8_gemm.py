"""Standalone int8 GEMM for aarch64 with ``sdot`` (ARMv8.2 dotprod): groundwork for W8A8.

Not wired into graph lowering yet (integer-only W8A8 is another issue); this provides the
kernel, its packing and a check that it compiles to ``sdot``.

Contract of :func:`int8_gemm_kernel` (destination-passing, built with
:func:`qcompile.backends.kernels._finish` conventions: scheduled, ``tirx.is_scheduled``,
no ``global_symbol``):

* args ``a int8[m, k]``, ``b int8[n/4, k/4, 4, 4]`` (:func:`pack_sdot` of ``w int8[k, n]``),
  ``c int32[m, n]`` with ``c = a @ w`` exactly (int32 accumulation; no overflow for
  k < 2**17 since |a*w| <= 2**14);
* ``k % 4 == 0`` and ``n % 4 == 0``; the target must have ``+dotprod``
  (:func:`sdot_supported`). Activations are signed: the host VNNI path's uint8 codes
  (zero point 128) map to these as ``a = u - 128`` (or use ``usdot`` on i8mm CPUs).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx

from qcompile.schedules import arm as sched_arm

from ..kernels import _check_dims, _finish

__all__ = ["int8_gemm_kernel", "pack_sdot", "sdot_supported"]


def sdot_supported(target: tvm.target.Target) -> bool:
    """True when ``target`` is aarch64 llvm with the dot-product extension."""
    if target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64")):
        return False
    return bool(target.attrs.get("feature.has_dotprod", False))


def pack_sdot(w: np.ndarray) -> np.ndarray:
    """int8 ``w[K, N]`` -> ``[N/4, K/4, 4, 4]`` with ``w[k, n]`` at ``[n // 4, k // 4, n % 4, k % 4]``."""
    k, n = w.shape
    if k % 4 or n % 4:
        raise ValueError(f"pack_sdot needs K % 4 == 0 and N % 4 == 0 (K={k}, N={n})")
    return np.ascontiguousarray(np.asarray(w, np.int8).reshape(k // 4, 4, n // 4, 4).transpose(2, 0, 3, 1))


def int8_gemm_kernel(m: int, k: int, n: int, target) -> tirx.PrimFunc:
    """c[m, n] (int32) = a[m, k] (int8) @ w[k, n] (int8, packed): see the module docstring."""
    _check_dims(m=m, k=k, n=n)
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if k % 4 or n % 4:
        raise ValueError(f"the sdot GEMM needs K % 4 == 0 and N % 4 == 0 (K={k}, N={n})")
    if not sdot_supported(target):
        raise ValueError("the sdot GEMM needs an aarch64 llvm target with +dotprod")
    a = te.placeholder((m, k), "int8", name="a")
    b = te.placeholder((n // 4, k // 4, 4, 4), "int8", name="b")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(a[i, r].astype("int32") * b[j // 4, r // 4, j % 4, r % 4].astype("int32"), axis=r),
        name="matmul")
    c = te.compute((m, n), lambda i, j: acc[i, j], name="epilogue")
    return _finish([a, b, c], target, lambda sch, _p: sched_arm.schedule_sdot_gemm(sch, "matmul", "epilogue", m, n))
