"""Decode-time (small m) kernels: memory-bound GEMV for packed low-bit weights and fp32.

Built directly as loop-level TIR with the IR builder (no schedule: the loop nest IS the
schedule), marked ``tirx.is_scheduled`` like the kernels of :mod:`qcompile.backends.kernels`,
same argument order and semantics as ``qlinear_kernel`` / ``linear_kernel``.

Why a separate kernel: at m <= 4 a quantized linear reads each packed byte once and does
O(m) arithmetic on it, so it is bound by memory bandwidth (or by the unpacking work), not by
FLOPs. The packed layout (``qcompile.quant``: row n of ``uint8[n, ceil(k*bits/8)]`` holds the
codes of output column n along k, LSB first) already makes each output column one contiguous
byte stream, so the kernels parallelise over n (both cores, contiguous blocks of columns)
and stream each row once with vector loads, unpacking codes in registers.

Algebra: with groups g along k,
``y[i, n] = sum_g s[n, g] * (sum_{k in g} x[i, k] * code[n, k]) - sum_g s[n, g] * z[n, g] * xsum[i, g]``
so the inner loop is a pure dot product of codes with (reordered) activations; the
zero-point term needs only the per-group activation sums, computed once per call.
Activations are first permuted so that the e-th code of each packed byte (unit) lines up
with a contiguous vector of x: ``xd[i, c, e, l] = x[i, (c * lanes + l) * cpb + e]``.
f32 activations, codes converted to f32 in registers: exact up to f32 reassociation; any
bits (3-bit: a unit is 3 bytes holding 8 codes); portable. (Batch-1 decode with int8
activations through VNNI, on a compile-time repacked layout, is :mod:`gemv_vnni`.)

Invariants: f32 output; no fp32 weight is ever materialized; every packed byte is read once
per call; the zero-point and bias terms are applied once per output.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

__all__ = ["GEMV_MAX_M", "gemv_variant", "use_fp32_gemv", "qgemv_kernel", "gemv_kernel"]

GEMV_MAX_M = 4  # rows up to which qlinear/linear use these kernels
ROWS_PER_BLOCK = 32  # output columns per parallel task


def _target(target):
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def _lanes(target) -> int:
    from qcompile.schedules import llvm as sched_llvm

    return max(1, sched_llvm.cpu_params(_target(target)).lanes)


def _units(bits: int) -> tuple[int, int]:
    """(bytes, codes) of the smallest whole-byte unit: 3-bit packs 8 codes in 3 bytes."""
    return (3, 8) if bits == 3 else (1, 8 // bits)


def _float_lanes(k: int, group: int, bits: int, lanes: int) -> int:
    """Vector lanes (units per step) dividing the units of a group; 0 if none fits."""
    _, cpu = _units(bits)
    if group % cpu or k % cpu:
        return 0
    per_group = group // cpu
    return next((l for l in (lanes, 8, 4, 2, 1) if l <= lanes and per_group % l == 0), 0)


def gemv_variant(m: int, k: int, n: int, bits: int, group_size: int, target) -> str | None:
    """Which qgemv variant ``qgemv_kernel`` builds for this shape: "float" or None."""
    if m > GEMV_MAX_M:
        return None
    return "float" if _float_lanes(k, group_size or k, bits, _lanes(target)) else None


def qgemv_kernel(m: int, k: int, n: int, bits: int, group_size: int, symmetric: bool,
                 has_bias: bool, target) -> tirx.PrimFunc:
    """Small-m fused dequant GEMV, same arguments as ``kernels.qlinear_kernel``.

    Raises ValueError when no variant fits (``gemv_variant`` returns None): callers then use
    the GEMM kernel.
    """
    if gemv_variant(m, k, n, bits, group_size, target) is None:
        raise ValueError(f"no GEMV variant for m={m} k={k} bits={bits} group_size={group_size}")
    group = group_size or k
    lanes = _float_lanes(k, group, bits, _lanes(target))
    return _build(_FloatGemv(m, k, n, bits, group, symmetric, has_bias, lanes))


def use_fp32_gemv(m: int, k: int, n: int, target) -> bool:
    """Whether ``linear_kernel`` should use :func:`gemv_kernel`: small m, a weight too big for
    the caches to be reused anyway (k*n >= 1M) and columns that fill whole vectors."""
    return m <= GEMV_MAX_M and k * n >= (1 << 20) and n % _lanes(target) == 0


def gemv_kernel(m: int, k: int, n: int, has_bias: bool, target) -> tirx.PrimFunc:
    """fp32 y[m, n] = x[m, k] @ w[k, n] (+ bias) for small m, streaming w row by row.

    Parallel over blocks of columns; each thread walks k and accumulates a register strip
    of ``lanes * 4`` columns (w rows are contiguous, so every byte of w is read once).
    """
    target = _target(target)
    cores = int(target.attrs.get("num-cores", 0) or 0) if target.kind.name == "llvm" else 0
    return _build(_FloatLinearGemv(m, k, n, has_bias, _lanes(target), max(cores, 2)))


# --------------------------------------------------------------------------------------------
# builders


def _build(body) -> tirx.PrimFunc:
    with IRBuilder() as ib:
        with T.prim_func():
            body.emit()
    func = ib.get()
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True).with_attr("tirx.noalias", True)


def _vec(dtype: str, lanes: int) -> str:
    return dtype if lanes == 1 else f"{dtype}x{lanes}"


def _bcast(value, lanes: int):
    return value if lanes == 1 else tirx.Broadcast(value, lanes)


def _store(buf, value, index, lanes: int):
    T.buffer_store(buf, value, [tirx.Ramp(index, 1, lanes) if lanes > 1 else index])


def _load(buf, index, lanes: int):
    return buf.vload([index], _vec(buf.dtype, lanes)) if lanes > 1 else buf[index]


class _QArgs:
    """Arguments common to both quantized variants (declared in qlinear_kernel's order)."""

    def __init__(self, m, k, n, bits, group, symmetric, has_bias):
        self.m, self.k, self.n, self.bits, self.group = m, k, n, bits, group
        self.symmetric, self.has_bias = symmetric, has_bias
        self.groups = k // group

    def declare(self):
        m, k, n = self.m, self.k, self.n
        self.x = T.arg("x", T.buffer((m, k), "float32"))
        self.q = T.arg("qweight", T.buffer((n, (k * self.bits + 7) // 8), "uint8"))
        self.s = T.arg("scales", T.buffer((n, self.groups), "float32"))
        self.z = None if self.symmetric else T.arg("zeros", T.buffer((n, self.groups), "float32"))
        self.b = T.arg("bias", T.buffer((n,), "float32")) if self.has_bias else None
        self.y = T.arg("y", T.buffer((m, n), "float32"))

    def zero_lanes(self) -> int:
        return next(l for l in (16, 8, 4, 2, 1) if self.groups % l == 0)

    def finish_row(self, j, i, acc, lanes, zt, xsum):
        """y[i, j] = sum(acc row i) - sum_g s[j, g] * z[j, g] * xsum[i, g] (+ bias[j]).

        ``xsum[i * G + g]``: the sum of x over group g; ``zt`` is a local of
        :meth:`zero_lanes` floats.
        """
        zl, groups = self.zero_lanes(), self.groups
        _store(zt, _bcast(tirx.const(0.0, "float32"), zl), 0, zl)
        with T.serial(0, groups // zl) as t:
            g0 = t * zl
            if self.z is None:
                zero = _bcast(tirx.const(float(1 << (self.bits - 1)), "float32"), zl)
            else:
                zero = _load_row(self.z, j, g0, zl, 1)
            term = _load_row(self.s, j, g0, zl, 1) * zero * _load(xsum, i * groups + g0, zl)
            _store(zt, _load(zt, 0, zl) + term, 0, zl)
        if lanes % zl == 0:  # fold the zero-point term into the lanes, then one reduction
            _store(acc, _load(acc, i * lanes, zl) - _load(zt, 0, zl), i * lanes, zl)
            self.finish(j, i, _lane_sum(acc, i * lanes, lanes))
        else:
            self.finish(j, i, _lane_sum(acc, i * lanes, lanes) - _lane_sum(zt, 0, zl))

    def finish(self, j, i, value):
        """y[i, j] = value (+ bias[j])."""
        if self.b is not None:
            value = value + self.b[j]
        T.buffer_store(self.y, value, [i, j])


class _FloatGemv(_QArgs):
    def __init__(self, m, k, n, bits, group, symmetric, has_bias, lanes):
        super().__init__(m, k, n, bits, group, symmetric, has_bias)
        self.lanes = lanes
        self.unit_bytes, self.cpu = _units(bits)
        self.units = k // self.cpu
        self.steps_per_group = group // self.cpu // lanes

    def emit(self):
        self.declare()
        m, L, cpu = self.m, self.lanes, self.cpu
        steps = self.units // L
        xd = T.decl_buffer((m * steps * cpu * L,), "float32")
        xsum = T.decl_buffer((m * self.groups,), "float32")
        self._prologue(xd, xsum, steps)
        U = 2 if self.steps_per_group % 2 == 0 else 1
        chains = cpu * U  # independent accumulators per row: hide the FMA latency

        def alloc():
            return (T.decl_buffer((m * L,), "float32", scope="local"),
                    T.decl_buffer((m * chains * L,), "float32", scope="local"),
                    T.decl_buffer((self.zero_lanes(),), "float32", scope="local"))

        def body(j, bufs):
            acc, part, zt = bufs
            zero = _bcast(tirx.const(0.0, "float32"), L)
            for i in range(m):
                _store(acc, zero, i * L, L)
            with T.serial(0, self.groups) as g:
                for a in range(m * chains):
                    _store(part, zero, a * L, L)
                with T.serial(0, self.steps_per_group // U) as t:
                    for u in range(U):
                        step = g * self.steps_per_group + t * U + u
                        for e, code in enumerate(self._codes(j, step * L)):
                            for i in range(m):
                                xv = _load(xd, ((i * steps + step) * cpu + e) * L, L)
                                a = ((i * cpu + e) * U + u) * L
                                _store(part, _load(part, a, L) + xv * code, a, L)
                scale = _bcast(self.s[j, g], L)
                for i in range(m):
                    total = _load(part, i * chains * L, L)
                    for c in range(1, chains):
                        total = total + _load(part, (i * chains + c) * L, L)
                    _store(acc, _load(acc, i * L, L) + total * scale, i * L, L)
            for i in range(m):
                self.finish_row(j, i, acc, L, zt, xsum)

        _parallel_rows(self.n, alloc, body)

    def _prologue(self, xd, xsum, steps):
        m, L, cpu, k = self.m, self.lanes, self.cpu, self.k
        with T.serial(0, m) as i:
            with T.serial(0, k) as kk:
                unit, e = kk // cpu, kk % cpu
                step, lane = unit // L, unit % L
                T.buffer_store(xd, self.x[i, kk], [((i * steps + step) * cpu + e) * L + lane])
            with T.serial(0, self.groups) as g:
                T.buffer_store(xsum, tirx.const(0.0, "float32"), [i * self.groups + g])
                with T.serial(0, self.group) as r:
                    idx = i * self.groups + g
                    T.buffer_store(xsum, xsum[idx] + self.x[i, g * self.group + r], [idx])

    def _codes(self, j, unit0):
        """f32 vectors of the cpu codes of units unit0 .. unit0+lanes-1 of row j."""
        L, bits, mask = self.lanes, self.bits, (1 << self.bits) - 1
        i32 = _vec("int32", L)
        if self.unit_bytes == 1:
            word = tirx.Cast(i32, _load_row(self.q, j, unit0, L, 1))
        else:
            b0, b1, b2 = (tirx.Cast(i32, _load_row(self.q, j, unit0 * 3 + o, L, 3)) for o in range(3))
            word = b0 | (b1 << _bcast(tirx.const(8, "int32"), L)) | (b2 << _bcast(tirx.const(16, "int32"), L))
        out = []
        for e in range(self.cpu):
            shifted = word if e == 0 else word >> _bcast(tirx.const(bits * e, "int32"), L)
            code = shifted if bits == 8 else shifted & _bcast(tirx.const(mask, "int32"), L)
            out.append(tirx.Cast(_vec("float32", L), code))
        return out


def _parallel_rows(n: int, alloc, body, step: int = 1) -> None:
    """Parallel loop over blocks of ``ROWS_PER_BLOCK`` rows, serial inside a block.

    ``alloc()`` declares the per-thread locals once per block (TVM turns allocations inside
    a parallel body into workspace calls, too slow once per row); ``body(j, locals)`` handles
    rows ``j .. j + step - 1`` (``step`` divides ``ROWS_PER_BLOCK`` and ``n``).
    """
    per = min(ROWS_PER_BLOCK, n)
    if per % step or n % step:
        raise ValueError(f"row step {step} must divide {per} and n={n}")
    with T.parallel(0, -(-n // per)) as jo:
        bufs = alloc()
        with T.serial(0, per // step) as jj:
            j = jo * per + jj * step
            if n % per == 0:
                body(j, bufs)
            else:
                with T.If(j < n):
                    with T.Then():
                        body(j, bufs)


def _lane_reduce(buf, start: int, lanes: int, op):
    """``op``-reduction of ``buf[start : start + lanes]`` by halving (log2 vector ops;
    overwrites the lanes) rather than a serial chain of scalar ops."""
    while lanes > 1 and lanes % 2 == 0:
        lanes //= 2
        _store(buf, op(_load(buf, start, lanes), _load(buf, start + lanes, lanes)), start, lanes)
    total = buf[start]
    for lane in range(1, lanes):
        total = op(total, buf[start + lane])
    return total


def _lane_sum(buf, start: int, lanes: int):
    return _lane_reduce(buf, start, lanes, _add)


def _add(a, b):
    return a + b


def _load_row(buf, row, start, lanes: int, stride: int):
    if lanes == 1:
        return buf[row, start]
    return tirx.BufferLoad(buf, [row, tirx.Ramp(start, stride, lanes)])


class _FloatLinearGemv:
    """Split k into ``parts`` contiguous row ranges of w (one long sequential stream each, in
    parallel), each accumulating a partial y[m, n] (L1/L2 resident); then sum the partials
    (+ bias) in parallel over columns."""

    def __init__(self, m, k, n, has_bias, lanes, parts):
        self.m, self.k, self.n, self.has_bias = m, k, n, has_bias
        self.lanes = lanes if n % lanes == 0 else 1
        self.parts = max(1, min(parts, k))

    def emit(self):
        m, k, n, L, P = self.m, self.k, self.n, self.lanes, self.parts
        x = T.arg("x", T.buffer((m, k), "float32"))
        w = T.arg("w", T.buffer((k, n), "float32"))
        bias = T.arg("bias", T.buffer((n,), "float32")) if self.has_bias else None
        y = T.arg("y", T.buffer((m, n), "float32"))
        zero = _bcast(tirx.const(0.0, "float32"), L)
        rows = -(-k // P)
        part = T.decl_buffer((P * m * n,), "float32")
        with T.parallel(0, P) as p:
            with T.serial(0, n // L) as v:
                for i in range(m):
                    _store(part, zero, (p * m + i) * n + v * L, L)
            with T.serial(0, rows) as rr:
                r = p * rows + rr
                with T.If(r < k):
                    with T.Then():
                        xs = [_bcast(x[i, r], L) for i in range(m)]
                        with T.serial(0, n // L) as v:
                            wv = _load_row(w, r, v * L, L, 1)
                            for i in range(m):
                                idx = (p * m + i) * n + v * L
                                _store(part, _load(part, idx, L) + xs[i] * wv, idx, L)
        with T.parallel(0, n // L) as v:
            col = v * L
            for i in range(m):
                val = _load(part, i * n + col, L)
                for q in range(1, P):
                    val = val + _load(part, (q * m + i) * n + col, L)
                if bias is not None:
                    val = val + _load_row_1d(bias, col, L)
                T.buffer_store(y, val, [i, tirx.Ramp(col, 1, L) if L > 1 else col])


def _load_row_1d(buf, start, lanes: int):
    return buf.vload([start], _vec(buf.dtype, lanes)) if lanes > 1 else buf[start]
