"""Scheduled TIR kernels for the linear-algebra ops (Linear, QLinear, batched MatMul, QGather).

Each builder returns a PrimFunc in destination-passing style (output last), already scheduled for
the given target by ``qcompile.schedules.llvm`` and marked ``tirx.is_scheduled`` (the name dlight reads) so the default
pipeline and dlight leave it alone. No ``global_symbol`` is set: the caller names the function
(``bb.call_tir(bb.add_func(f, name), ...)``).

Invariants:
* f32 compute, f32 accumulation, inputs row-major as documented per builder.
* Packed weights use ``qcompile.quant``'s ``n_major_lsb_first`` layout: row n of
  ``uint8[n, ceil(k*bits/8)]`` is the little-endian bit stream of the k codes of column n.
  Dequantization is ``(code - zero) * scale`` evaluated in f32 exactly as
  ``qcompile.quant.dequantize_weight`` does (bit-identical weights); symmetric means
  ``zero = 2**(bits-1)``. Grouping is along k; ``group_size`` 0 means one group.
* qlinear never materializes the fp32 weight: a K x nr column panel is dequantized into a
  per-thread buffer inside the parallel loop, right before the register-tiled GEMM uses it.
* Only the block names "matmul", "epilogue", "dequant", "gather" are relied on by the schedules.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from qcompile.schedules import llvm as sched_llvm

from . import gemv_kernels

__all__ = [
    "SUPPORTED_BITS",
    "linear_kernel",
    "qlinear_kernel",
    "batch_matmul_kernel",
    "int_batch_matmul_kernel",
    "qgather_kernel",
]

SUPPORTED_BITS = (2, 3, 4, 8)


def linear_kernel(m: int, k: int, n: int, has_bias: bool, target) -> tirx.PrimFunc:
    """y[m, n] = x[m, k] @ w[k, n] (+ bias[n]).  Args: x, w, [bias], y."""
    _check_dims(m=m, k=k, n=n)
    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((k, n), "float32", name="w")
    bias = te.placeholder((n,), "float32", name="bias") if has_bias else None
    mm = _matmul(x, lambda r, j: w[r, j], m, k, n)
    if gemv_kernels.use_fp32_gemv(m, k, n, target):  # decode: stream w once (backends/gemv_kernels.py)
        return gemv_kernels.gemv_kernel(m, k, n, has_bias, target)
    y = _epilogue(mm, bias)
    args = [x, w] + ([bias] if has_bias else []) + [y]
    return _finish(args, target, lambda sch, p: sched_llvm.schedule_gemm(
        sch, "matmul", "epilogue", m, n, p))


def qlinear_kernel(m: int, k: int, n: int, bits: int, group_size: int, symmetric: bool,
                   has_bias: bool, target) -> tirx.PrimFunc:
    """Fused weight-only quantized linear: y = x @ dequant(qweight) (+ bias).

    Args: x f32[m, k], qweight uint8[n, ceil(k*bits/8)], scales f32[n, G],
    zeros f32[n, G] (only if not symmetric), bias f32[n] (if has_bias), y f32[m, n];
    G = k // group_size (1 if group_size is 0).
    For m <= ``gemv_kernels.GEMV_MAX_M`` this returns the streaming GEMV of
    :mod:`qcompile.backends.gemv_kernels` where a variant fits (exact f32 activations).
    """
    _check_dims(m=m, k=k, n=n)
    gs, groups = _groups(k, group_size, bits)
    if gemv_kernels.gemv_variant(m, k, n, bits, group_size, target) is not None:
        return gemv_kernels.qgemv_kernel(m, k, n, bits, group_size, symmetric, has_bias, target)
    qweight = te.placeholder((n, _packed_len(k, bits)), "uint8", name="qweight")
    scales = te.placeholder((n, groups), "float32", name="scales")
    zeros = None if symmetric else te.placeholder((n, groups), "float32", name="zeros")
    x = te.placeholder((m, k), "float32", name="x")
    bias = te.placeholder((n,), "float32", name="bias") if has_bias else None
    wdq = te.compute(
        (k, n), lambda r, j: _dequant(qweight, scales, zeros, j, r, bits, gs), name="dequant")
    mm = _matmul(x, lambda r, j: wdq[r, j], m, k, n)
    y = _epilogue(mm, bias)
    args = [x, qweight, scales] + ([zeros] if zeros is not None else [])
    args += ([bias] if has_bias else []) + [y]

    def schedule(sch, p):
        sched_llvm.schedule_gemm(sch, "matmul", "epilogue", m, n, p, panel="dequant")
        sched_llvm.schedule_dequant_panel(sch, "dequant", n, p, gs, _codes_per_step(bits))

    return _finish(args, target, schedule)


def batch_matmul_kernel(batch: int, m: int, k: int, n: int, target) -> tirx.PrimFunc:
    """y[b, m, n] = a[b, m, k] @ b[b, k, n].  Args: a, b, y."""
    return _batch_matmul(batch, m, k, n, ("float32", None), ("float32", None), "float32", target)


def int_batch_matmul_kernel(batch: int, m: int, k: int, n: int, a_dtype: str, b_dtype: str, a_zero: int,
                            b_zero: int, target) -> tirx.PrimFunc:
    """int32 y[b, m, n] = (a - a_zero)[b, m, k] @ (b - b_zero)[b, k, n]: the VNNI kernel of
    :mod:`.int_batch_gemm` for 8-bit operands where it applies, else operands widened to int32."""
    from . import int_batch_gemm  # imports this module

    if int_batch_gemm.applies(target, k, n, a_dtype, b_dtype, b_zero):
        return int_batch_gemm.u8_batch_matmul_kernel(batch, m, k, n, b_dtype, a_zero, b_zero, target)
    return _batch_matmul(batch, m, k, n, (a_dtype, a_zero), (b_dtype, b_zero), "int32", target)


def _batch_matmul(batch, m, k, n, a_spec, b_spec, out_dtype, target) -> tirx.PrimFunc:
    """The batched GEMM of both kernels above: operand spec = (dtype, zero point or None)."""
    _check_dims(batch=batch, m=m, k=k, n=n)
    a = te.placeholder((batch, m, k), a_spec[0], name="a")
    b = te.placeholder((batch, k, n), b_spec[0], name="b")

    def load(x, spec, *idx):
        v = x[idx] if spec[1] is None else x[idx].astype(out_dtype)
        return v - tirx.const(spec[1], out_dtype) if spec[1] else v

    # a narrow B is widened (minus its zero point) once per column panel, not in the inner loop
    widen = b_spec[0] != out_dtype
    bw = te.compute((batch, k, n), lambda t, r, j: load(b, b_spec, t, r, j), name="widen") if widen else None
    r = te.reduce_axis((0, k), name="r")
    b_at = (lambda t, r, j: bw[t, r, j]) if widen else (lambda t, r, j: load(b, b_spec, t, r, j))  # noqa: E731
    mm = te.compute((batch, m, n), lambda t, i, j: te.sum(load(a, a_spec, t, i, r) * b_at(t, r, j), axis=r),
                    name="matmul")
    y = te.compute((batch, m, n), lambda t, i, j: mm[t, i, j], name="epilogue")

    def schedule(sch, params):
        sched_llvm.schedule_gemm(sch, "matmul", "epilogue", m, n, params, batched=True,
                                 panel="widen" if widen else None)
        if widen:
            sched_llvm.schedule_dequant_panel(sch, "widen", n, params, k, 1)

    return _finish([a, b, y], target, schedule)


def qgather_kernel(v: int, d: int, num_indices: int, bits: int, group_size: int,
                   symmetric: bool, target) -> tirx.PrimFunc:
    """Row-quantized embedding lookup: y[i, :] = dequant(qtable)[indices[i], :].

    Args: qtable uint8[v, ceil(d*bits/8)], scales f32[v, G], zeros f32[v, G] (if not
    symmetric), indices int64[num_indices], y f32[num_indices, d]; groups run along d.
    Negative indices wrap once (ONNX Gather); out-of-range indices are clamped (memory safety).
    """
    _check_dims(v=v, d=d, num_indices=num_indices)
    gs, groups = _groups(d, group_size, bits)
    qtable = te.placeholder((v, _packed_len(d, bits)), "uint8", name="qtable")
    scales = te.placeholder((v, groups), "float32", name="scales")
    zeros = None if symmetric else te.placeholder((v, groups), "float32", name="zeros")
    indices = te.placeholder((num_indices,), "int64", name="indices")

    def row_of(i):
        raw = indices[i].astype("int32")
        wrapped = tirx.Select(raw < 0, raw + v, raw)
        return te.max(te.min(wrapped, v - 1), 0)

    y = te.compute((num_indices, d),
                   lambda i, c: _dequant(qtable, scales, zeros, row_of(i), c, bits, gs),
                   name="gather")
    args = [qtable, scales] + ([zeros] if zeros is not None else []) + [indices, y]
    return _finish(args, target, lambda sch, p: sched_llvm.schedule_gather(
        sch, "gather", num_indices, d, p))


# --------------------------------------------------------------------------------------------
# helpers


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"kernel dimension {name} must be a positive int, got {value!r}")


def _groups(k: int, group_size: int, bits: int) -> tuple[int, int]:
    """(group size, number of groups) along the quantized axis of length ``k``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; expected one of {SUPPORTED_BITS}")
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0, got {group_size}")
    if group_size == 0:
        return k, 1
    if k % group_size:
        raise ValueError(
            f"quantized axis length {k} is not a multiple of group_size {group_size}")
    return group_size, k // group_size


def _packed_len(k: int, bits: int) -> int:
    return (k * bits + 7) // 8


def _codes_per_step(bits: int) -> int:
    """Consecutive codes that share their packed bytes (8 codes = 3 bytes for 3-bit)."""
    return 8 if bits == 3 else 8 // bits


def _code(packed: te.Tensor, row, col, bits: int):
    """Unsigned code ``col`` of packed row ``row`` as int32 (little-endian bit stream)."""
    if bits == 8:
        return packed[row, col].astype("int32")
    bitpos = col * bits
    byte = tirx.floordiv(bitpos, 8)
    shift = tirx.floormod(bitpos, 8)
    mask = (1 << bits) - 1
    lo = packed[row, byte].astype("int32")
    if 8 % bits == 0:  # 2 and 4 bits: codes never straddle bytes
        return tirx.bitwise_and(tirx.shift_right(lo, shift), mask)
    last = packed.shape[1] - 1
    nxt = packed[row, te.min(byte + 1, last)].astype("int32")
    hi = tirx.Select(byte < last, nxt, tirx.const(0, "int32"))
    word = tirx.bitwise_or(lo, tirx.shift_left(hi, 8))
    return tirx.bitwise_and(tirx.shift_right(word, shift), mask)


def _dequant(packed, scales, zeros, row, col, bits: int, gs: int):
    """(code - zero) * scale for element (row, col) of a packed [rows, cols] table."""
    g = tirx.floordiv(col, gs) if scales.shape[1] > 1 else 0
    code = _code(packed, row, col, bits).astype("float32")
    zero = zeros[row, g] if zeros is not None else tirx.const(float(1 << (bits - 1)), "float32")
    return (code - zero) * scales[row, g]


def _matmul(x: te.Tensor, w_at, m: int, k: int, n: int) -> te.Tensor:
    r = te.reduce_axis((0, k), name="r")
    return te.compute((m, n), lambda i, j: te.sum(x[i, r] * w_at(r, j), axis=r), name="matmul")


def _epilogue(mm: te.Tensor, bias: te.Tensor | None) -> te.Tensor:
    if bias is None:
        return te.compute(mm.shape, lambda i, j: mm[i, j], name="epilogue")
    return te.compute(mm.shape, lambda i, j: mm[i, j] + bias[j], name="epilogue")


def _finish(args, target, schedule) -> tirx.PrimFunc:
    """create_prim_func -> schedule for ``target`` -> mark scheduled, drop global_symbol."""
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    func = te.create_prim_func(args)
    sch = tvm.s_tir.Schedule(func)
    schedule(sch, sched_llvm.cpu_params(target))
    func = sch.mod["main"]
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True)
