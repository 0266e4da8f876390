"""TE kernels of the W8A8 path: per-row activation quantization and the int8 GEMM.

Semantics are those of :mod:`qcompile.ops` (``QuantizeAct``, ``Int8Linear``) and of the
reference kernels in :mod:`qcompile.int8_reference`; the compiled kernels reproduce them
exactly up to float32 rounding of the final rescale.

Layout contract (shared with :mod:`qcompile.backends.int8_lowering`):

* activation codes are ``uint8`` with zero point 128 (u = q + 128, q in [-127, 127]), which is
  what ``vpdpbusd`` (u8 x s8 -> s32) consumes; the GEMM subtracts ``corr[n] = 128 * sum_k w[k, n]``
  (an int32 constant computed at compile time);
* weights are ``int8``: pre-packed ``[N/16, K/4, 16, 4]`` (element ``w[k, n]`` at
  ``[n // 16, k // 4, n % 16, k % 4]``) for the VNNI kernel, plain ``[K, N]`` otherwise.

Both are built with :func:`qcompile.backends.kernels._finish` conventions: scheduled,
``tirx.is_scheduled`` set, no ``global_symbol``.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from . import int8_gemm  # module import: int8_gemm imports this module too
from .kernels import _check_dims, _finish

__all__ = ["quantize_rows_kernel", "quantize_static_kernel", "int8_linear_kernel", "pack_vnni",
           "vnni_supported", "round_half_even", "AMAX_FLOOR"]

AMAX_FLOOR = 1e-8  # rows whose absmax is below this use it instead (no division by zero)


def vnni_supported(target) -> bool:
    """True when ``target`` is x86 llvm with AVX-512 VNNI (``vpdpbusd`` on zmm registers)."""
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())
    if not triple.startswith("x86_64"):
        return False
    return bool(tvm.target.codegen.target_has_features(["avx512vnni", "avx512bw"], target))


def pack_vnni(w):
    """int8 w[K, N] -> [N/16, K/4, 16, 4] (numpy; K % 4 == 0 and N % 16 == 0)."""
    k, n = w.shape
    return w.reshape(k // 4, 4, n // 16, 16).transpose(2, 0, 3, 1).copy()


def quantize_rows_kernel(m: int, k: int, target, qmax: int = 127) -> tirx.PrimFunc:
    """Dynamic per-row symmetric quantization.  Args: x f32[m, k], u uint8[m, k], scale f32[m, 1].

    amax = max(max_k |x|, AMAX_FLOOR); scale = amax / qmax; u = clip(rne(x * (qmax / amax)),
    -qmax, qmax) + 128 (qmax 127, or 7 for 4-bit activation codes).
    """
    _check_dims(m=m, k=k)
    lanes = 16 if k % 16 == 0 else 1
    x = te.placeholder((m, k), "float32", name="x")
    ro = te.reduce_axis((0, k // lanes), name="ro")
    part = te.compute((m, lanes), lambda i, l: te.max(te.abs(x[i, ro * lanes + l]), axis=ro), name="part")
    rl = te.reduce_axis((0, lanes), name="rl")
    amax = te.compute((m,), lambda i: te.max(part[i, rl], axis=rl), name="amax")
    floor = tirx.const(AMAX_FLOOR, "float32")
    top = tirx.const(float(qmax), "float32")
    inv = te.compute((m,), lambda i: top / te.max(amax[i], floor), name="inv")
    scale = te.compute((m, 1), lambda i, _: te.max(amax[i], floor) / top, name="scale")
    u = te.compute((m, k), lambda i, j: _to_u8(x[i, j] * inv[i], target, qmax), name="quant")
    from qcompile.schedules import llvm_int8 as sched  # on first use: it registers the VNNI intrinsic

    return _finish([x, u, scale], target, lambda s, p: sched.schedule_quantize_rows(s, m, k, lanes, p))


def quantize_static_kernel(m: int, k: int, scale: float, target, qmax: int = 127) -> tirx.PrimFunc:
    """Static per-tensor quantization.  Args: x f32[m, k], u uint8[m, k].

    u = clip(rne(x * float32(1 / scale)), -qmax, qmax) + 128.
    """
    _check_dims(m=m, k=k)
    x = te.placeholder((m, k), "float32", name="x")
    inv = tirx.const(float(_f32_inverse(scale)), "float32")
    u = te.compute((m, k), lambda i, j: _to_u8(x[i, j] * inv, target, qmax), name="quant")
    from qcompile.schedules import llvm_int8 as sched  # on first use: it registers the VNNI intrinsic

    return _finish([x, u], target, lambda s, p: sched.schedule_elementwise(s, "quant", m, k, p))


def _f32_inverse(scale: float):
    import numpy as np

    return np.float32(1.0) / np.float32(scale)


def round_half_even(v, target):
    """Round to nearest, ties to even. On llvm targets ``llvm.roundeven``, which TVM's
    vectorizer keeps as one vector instruction (``tirx.nearbyint`` is scalarized, and LLVM then
    re-vectorizes the wrong loop with gathers); elsewhere ``nearbyint`` (default FP environment)."""
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name == "llvm":
        return tirx.call_llvm_pure_intrin("float32", "llvm.roundeven", v)
    return tirx.nearbyint(v)


def _to_u8(v, target, qmax: int = 127):
    r = round_half_even(v, target)
    r = te.max(te.min(r, tirx.const(float(qmax), "float32")), tirx.const(-float(qmax), "float32"))
    return (r.astype("int32") + 128).astype("uint8")


def u8s8_matmul(m: int, k: int, n: int, vnni: bool):
    """The int32 block ``matmul`` = u[m, k] (uint8) x w (int8; [K, N], or packed
    [N/16, K/4, 16, 4] for VNNI) shared by every int8 GEMM kernel. Returns (u, w, acc)."""
    _check_dims(m=m, k=k, n=n)
    if vnni and (k % 4 or n % 16):
        raise ValueError(f"the VNNI kernel needs K % 4 == 0 and N % 16 == 0 (K={k}, N={n})")
    u = te.placeholder((m, k), "uint8", name="u")
    if vnni:
        w = te.placeholder((n // 16, k // 4, 16, 4), "int8", name="w")
        w_at = lambda r, j: w[j // 16, r // 4, j % 16, r % 4]  # noqa: E731
    else:
        w = te.placeholder((k, n), "int8", name="w")
        w_at = lambda r, j: w[r, j]  # noqa: E731
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((m, n), lambda i, j: te.sum(u[i, r].astype("int32") * w_at(r, j).astype("int32"), axis=r),
                     name="matmul")
    return u, w, acc


def int8_linear_kernel(m: int, k: int, n: int, has_bias: bool, per_row: bool, gemm,
                       target) -> tirx.PrimFunc:
    """y = float32(sum_k u*w - corr) * (xscale * wscale) (+ bias).

    Args: u uint8[m, k], xscale f32[m, 1] (per_row) or f32[1, 1], w int8 (packed for ``gemm``),
    wscale f32[n], corr int32[n], bias f32[n] (if has_bias), y f32[m, n]. ``gemm``: a
    :mod:`qcompile.backends.int8_gemm` kind (True / False: "vnni" / "portable"), which also
    fixes ``corr`` (``int8_gemm.zero_point_correction``).
    """
    u, w, acc = int8_gemm.matmul(m, k, n, gemm)
    xscale = te.placeholder((m if per_row else 1, 1), "float32", name="xscale")
    wscale = te.placeholder((n,), "float32", name="wscale")
    corr = te.placeholder((n,), "int32", name="corr")
    bias = te.placeholder((n,), "float32", name="bias") if has_bias else None

    def out(i, j):
        s = xscale[i if per_row else 0, 0] * wscale[j]
        y = (acc[i, j] - corr[j]).astype("float32") * s
        return y + bias[j] if bias is not None else y

    y = te.compute((m, n), out, name="epilogue")
    args = [u, xscale, w, wscale, corr] + ([bias] if has_bias else []) + [y]
    schedule = int8_gemm.schedule(gemm)
    return _finish(args, target, lambda s, p: schedule(s, "matmul", "epilogue", m, n, p))
