"""Row-interleaved VNNI GEMV for 2/4-bit weights at m = 1: packing, reference, kernel.

The layout of onnxruntime's MatMulNBits / llama.cpp x86 kernels: 16 output rows share one
AVX-512 register, so each int32 lane of a ``vpdpbusd`` is a different output row and no lane
reduction is ever needed. Activations are quantized per block to int8 (symmetric, the scheme
of MatMulNBits accuracy_level 4) and broadcast 4 at a time (one dword = 4 int8 activations);
weight codes are the unsigned operand, unpacked by a single AND each:

* 4-bit: a 64-byte vector holds 16 rows x 8 codes; ``w & 0x0f`` (codes k0..k3 of each dword)
  and ``w & 0xf0`` (k4..k7, 16x the code) feed two int32 accumulators; at the block end
  ``acc_0 + (acc_1 >> 4)`` is exact (acc_1 is a multiple of 16).
* 2-bit: 16 rows x 16 codes; masks ``0x03, 0x0c, 0x30, 0xc0`` into four accumulators,
  combined as ``acc_0 + (acc_1 >> 2) + (acc_2 >> 4) + (acc_3 >> 6)``.

Algebra: with activation blocks b (``vnni_block``: the weight group, or a divisor <= 256 of
longer groups), ``xs[b] = max|x_b| / 127``, ``xq = rint(x * (127 / max|x_b|))`` (int8) and
QLinear weights ``W[k, n] = (code - z[n, g]) * s[n, g]``::

    y[n] = sum_b s[n, g(b)] * xs[b] * acc[n, b]  -  sum_b o[n, g(b)] * xw[b]  (+ bias[n])
    acc[n, b] = sum_{k in b} code[n, k] * xq[k]          (exact int32)
    o = s * z (asymmetric: packed),  xw[b] = xs[b] * sum_{k in b} xq[k]
    symmetric: o = s, xw[b] scaled by z = 2^(bits-1) in the kernel

Layout (:func:`pack_vnni_weights`, from ``qcompile.quant``'s packed codes), R = 16 * tiles
rows per parallel task (``vnni_tiles``: that many row vectors accumulate side by side, from
one contiguous byte stream):

* ``codes uint8[n/R, k/c * R * 4]`` with c = 32 / bits codes per dword: byte
  ``[r, (h * R + v) * 4 + j]`` holds, for row ``n = r*R + v``, the codes at
  ``k = c*h + 4*e + j`` in bit field e (``bits`` bits, LSB first), e = 0 .. 8/bits - 1;
* ``scales``, ``offsets`` (asymmetric only): ``float32[n/R, groups, R]``.

Kernel arguments (destination passing): ``x f32[1, k], codes, scales, [offsets],
[bias f32[n]], y f32[1, n]``. Precision: the integer parts equal
:func:`vnni_gemv_reference`'s exactly; the float parts differ by summation order (~1e-6
relative). Against the exact f32 GEMV the error is the int8 activation rounding.
Invariants: y is the accumulator (no per-task workspace), every code byte is read once per
call, the parallel loop runs over tasks of R rows (both cores, contiguous ranges).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import tirx as T

from qcompile import quant

from .gemv_kernels import _bcast, _build, _lane_reduce, _lane_sum, _load, _load_row, _store, _target
from .lut_kernels import group_params_by_rows

__all__ = ["VNNI_BITS", "has_vnni", "vnni_supported", "vnni_block", "vnni_tiles", "pack_vnni_weights",
           "vnni_arrays", "quantize_activations", "vnni_gemv_reference", "vnni_gemv_kernel"]

VNNI_BITS = (2, 4)
LANES = 16  # int32 lanes of a zmm: output rows per vector
MAX_CHAINS = 8  # int32 accumulator chains per step (row vectors x bit fields): enough to cover
# vpdpbusd's latency at its throughput; 16 (2-bit x 4 vectors) measured ~5% slower on Zen 4
MAX_BLOCK = 256  # activations per int8 scale when groups are longer
_DPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def has_vnni(target) -> bool:
    """True for x86 llvm targets with AVX-512 VNNI (+VL): ``vpdpbusd`` on xmm/ymm/zmm."""
    target = _target(target)
    if target.kind.name != "llvm":
        return False
    has = tvm.target.codegen.target_has_features
    return bool(has(["avx512vnni"], target) and has(["avx512vl"], target) and has(["avx512bw"], target))


def vnni_block(k: int, group_size: int) -> int:
    """Activations per int8 scale: the group, or the largest multiple of 16 <= 256 dividing it."""
    group = group_size or k
    return next((b for b in range(min(group, MAX_BLOCK) // 16 * 16, 0, -16) if group % b == 0), 0)


def vnni_tiles(n: int, bits: int) -> int:
    """Row vectors per step: the most (4, 2 or 1) whose rows divide n, with one accumulator
    chain per bit field each, at most MAX_CHAINS chains."""
    return next(t for t in (4, 2, 1) if n % (LANES * t) == 0 and t * (8 // bits) <= MAX_CHAINS)


def vnni_supported(k: int, n: int, bits: int, group_size: int, target) -> str | None:
    """None when the kernel fits, else why not (a sentence)."""
    group = group_size or k
    if not has_vnni(target):
        return "the target has no AVX-512 VNNI"
    if bits not in VNNI_BITS:
        return f"bits must be one of {VNNI_BITS} (got {bits})"
    if k % group or group % 16:
        return f"group size {group} must divide k={k} and be a multiple of 16"
    if n % LANES:
        return f"n={n} must be a multiple of {LANES} (rows per vector)"
    return None


def vnni_gemv_kernel(k: int, n: int, bits: int, group_size: int, symmetric: bool, has_bias: bool,
                     target) -> tirx.PrimFunc:
    """The VNNI GEMV y[1, n] = x[1, k] @ W (module docstring); ValueError if it does not fit."""
    reason = vnni_supported(k, n, bits, group_size, _target(target))
    if reason:
        raise ValueError(f"no VNNI GEMV for k={k} n={n} bits={bits} group_size={group_size}: {reason}")
    return _build(_VnniGemv(k, n, bits, group_size or k, symmetric, has_bias))


# ---------------------------------------------------------------------------- packing
def pack_vnni_weights(packed, scales, zeros, bits: int, k: int) -> dict:
    """QLinear weights (``quant.pack_codes`` codes, scales/zeros ``[n, groups]``, zeros None =
    symmetric) -> {"codes", "scales", "offsets" (None if symmetric)} in the kernel layout."""
    codes = quant.unpack_codes(np.asarray(packed), bits, k)  # [n, k]
    n = codes.shape[0]
    rows, per_dword, fields = LANES * vnni_tiles(n, bits), 32 // bits, 8 // bits
    if n % LANES or k % per_dword:
        raise ValueError(f"VNNI packing needs n % {LANES} == 0 and k % {per_dword} == 0 (n={n}, k={k})")
    split = codes.reshape(n, k // per_dword, fields, 4).astype(np.uint8)
    shifts = (np.arange(fields, dtype=np.uint8) * bits)[None, None, :, None]
    dwords = np.bitwise_or.reduce(split << shifts, axis=2)  # [n, k/c, 4]
    tiled = dwords.reshape(n // rows, rows, k // per_dword, 4).transpose(0, 2, 1, 3)
    scales = np.asarray(scales, np.float32)
    offsets = None if zeros is None else scales * np.asarray(zeros, np.float32)
    return {"codes": np.ascontiguousarray(tiled.reshape(n // rows, -1)),
            "scales": group_params_by_rows(scales, rows),
            "offsets": None if offsets is None else group_params_by_rows(offsets, rows)}


def vnni_arrays(packed: dict, bias=None) -> list[np.ndarray]:
    """The kernel's weight-side arguments in order (after x, before y)."""
    out = [packed["codes"], packed["scales"]]
    return out + ([packed["offsets"]] if packed["offsets"] is not None else []) + ([bias] if bias is not None else [])


# ---------------------------------------------------------------------------- reference
def quantize_activations(x, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 xq[k], f32 xs[k/block]) for x[k], with the kernel's exact f32 operations."""
    xb = np.asarray(x, np.float32).reshape(-1, block)
    amax = np.abs(xb).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.rint(xb * inv[:, None]).astype(np.int8).reshape(-1)
    return xq, (amax * np.float32(1.0 / 127.0)).astype(np.float32)


def vnni_gemv_reference(x, packed, scales, zeros, bits: int, group_size: int, bias=None) -> np.ndarray:
    """numpy model of the kernel on QLinear weights: exact int accumulations, f32 [1, n] out."""
    x = np.asarray(x, np.float32).reshape(-1)
    k = x.size
    group, block = group_size or k, vnni_block(k, group_size)
    xq, xs = quantize_activations(x, block)
    codes = quant.unpack_codes(np.asarray(packed), bits, k).astype(np.int64)
    n = codes.shape[0]
    acc = (codes * xq.astype(np.int64)[None, :]).reshape(n, k // block, block).sum(axis=2)
    g_of_b = np.arange(k // block) * block // group
    zero = np.float64(1 << (bits - 1)) if zeros is None else np.asarray(zeros, np.float64)[:, g_of_b]
    xsum = xq.astype(np.int64).reshape(-1, block).sum(axis=1)
    s = np.asarray(scales, np.float64)[:, g_of_b]
    y = (s * xs[None, :] * (acc - zero * xsum[None, :])).sum(axis=1)
    if bias is not None:
        y += np.asarray(bias, np.float64)
    return y.astype(np.float32)[None, :]


# ---------------------------------------------------------------------------- kernel
class _VnniGemv:
    def __init__(self, k, n, bits, group, symmetric, has_bias):
        self.k, self.n, self.bits, self.group = k, n, bits, group
        self.symmetric, self.has_bias = symmetric, has_bias
        self.groups, self.block = k // group, vnni_block(k, group)
        self.blocks = k // self.block
        self.tiles = vnni_tiles(n, bits)
        self.rows = LANES * self.tiles
        self.fields = 8 // bits  # codes per byte = accumulators per row vector
        self.per_dword = 32 // bits

    def emit(self):
        k, n, rows = self.k, self.n, self.rows
        x = T.arg("x", T.buffer((1, k), "float32"))
        self.w = T.arg("codes", T.buffer((n // rows, k // self.per_dword * rows * 4), "uint8"))
        self.s = T.arg("scales", T.buffer((n // rows, self.groups, rows), "float32"))
        self.o = None if self.symmetric else T.arg("offsets", T.buffer((n // rows, self.groups, rows), "float32"))
        bias = T.arg("bias", T.buffer((n,), "float32")) if self.has_bias else None
        y = T.arg("y", T.buffer((1, n), "float32"))
        xq = T.decl_buffer((k // 4,), "int32")  # int8 activations, 4 per dword
        xs = T.decl_buffer((self.blocks,), "float32")
        xw = T.decl_buffer((self.blocks,), "float32")
        self._quantize(x, xq, xs, xw)
        L = LANES
        with T.parallel(0, n // rows) as r:
            for t in range(self.tiles):
                row = r * rows + t * L
                init = _load(bias, row, L) if bias is not None else _bcast(tirx.const(0.0, "float32"), L)
                T.buffer_store(y, init, [0, tirx.Ramp(row, 1, L)])
            with T.serial(0, self.blocks) as b:
                g = b * self.block // self.group
                for t, dot in enumerate(self._block_dots(r, b, xq)):
                    row = r * rows + t * L
                    s = _load_row3(self.s, r, g, t * L, L)
                    zero = s if self.o is None else _load_row3(self.o, r, g, t * L, L)
                    prev = tirx.BufferLoad(y, [0, tirx.Ramp(row, 1, L)])
                    val = prev + tirx.Cast(f"float32x{L}", dot) * (s * _bcast(xs[b], L)) - zero * _bcast(xw[b], L)
                    T.buffer_store(y, val, [0, tirx.Ramp(row, 1, L)])

    def _block_dots(self, r, b, xq) -> list:
        """int32x16 dot products of activation block ``b`` with the row vectors of task ``r``.

        ``tiles * fields`` accumulator chains (vector t, bit field e), each step a flat
        ``T.bind`` in step-major order, so the chains interleave and stay in registers (no
        buffer: a local inside the parallel loop would be a workspace call per task); at the
        end field e is shifted right by ``bits * e`` (exact) and the fields summed."""
        L, rows, bits, fields = LANES, self.rows, self.bits, self.fields
        steps = self.block // self.per_dword
        acc = [[_bcast(tirx.const(0, "int32"), L)] * fields for _ in range(self.tiles)]
        for step in range(steps):
            h = b * steps + step
            xv = [_i8(_bcast(xq[h * fields + e], L)) for e in range(fields)]
            for t in range(self.tiles):
                raw = self.w.vload([r, (h * rows + t * L) * 4], "uint8x64")
                for e in range(fields):
                    mask = _bcast(tirx.const(((1 << bits) - 1) << (bits * e), "uint8"), 64)
                    dot = tirx.call_llvm_pure_intrin(f"int32x{L}", _DPBUSD, acc[t][e], _i8(raw & mask), xv[e])
                    acc[t][e] = T.bind(dot)
        out = []
        for per_field in acc:
            total = per_field[0]
            for e in range(1, fields):
                total = total + (per_field[e] >> _bcast(tirx.const(bits * e, "int32"), L))
            out.append(total)
        return out

    def _quantize(self, x, xq, xs, xw):
        """Per block: xs = max|x| / 127, xq = rint(x * 127 / max|x|) (int8, 4 per dword of
        ``xq``), xw = xs * sum(xq) (times 2^(bits-1) for symmetric weights). 16 lanes a step."""
        V, blk = 16, self.block
        vmax = T.decl_buffer((V,), "float32", scope="local")
        vsum = T.decl_buffer((V,), "float32", scope="local")
        zero = _bcast(tirx.const(0.0, "float32"), V)
        with T.serial(0, self.blocks) as b:
            _store(vmax, zero, 0, V)
            with T.serial(0, blk // V) as p:
                _store(vmax, tirx.max(_load(vmax, 0, V), tirx.abs(_load_row(x, 0, b * blk + p * V, V, 1))), 0, V)
            amax = _lane_reduce(vmax, 0, V, tirx.max)
            inv = tirx.Select(amax > tirx.const(0.0, "float32"), tirx.const(127.0, "float32") / amax,
                              tirx.const(0.0, "float32"))
            T.buffer_store(xs, amax * tirx.const(1.0 / 127.0, "float32"), [b])
            _store(vsum, zero, 0, V)
            with T.serial(0, blk // V) as p:
                q = tirx.nearbyint(_load_row(x, 0, b * blk + p * V, V, 1) * _bcast(inv, V))
                packed = tirx.call_intrin("int32x4", "tirx.reinterpret", tirx.Cast(f"int8x{V}", q))
                _store(xq, packed, (b * blk + p * V) // 4, 4)
                _store(vsum, _load(vsum, 0, V) + q, 0, V)
            total = _lane_sum(vsum, 0, V)
            if self.symmetric:
                total = total * tirx.const(float(1 << (self.bits - 1)), "float32")
            T.buffer_store(xw, xs[b] * total, [b])


def _i8(vec):
    """Reinterpret a 64-byte vector (int32x16 / uint8x64) as int8x64, vpdpbusd's byte operand."""
    return tirx.call_intrin("int8x64", "tirx.reinterpret", vec)


def _load_row3(buf, r, g, start, lanes: int):
    return tirx.BufferLoad(buf, [r, g, tirx.Ramp(start, 1, lanes)])
