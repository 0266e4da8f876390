"""T-MAC style lookup-table (LUT) GEMV for low-bit weights at m = 1: packing, reference, kernel.

Idea (T-MAC, Wei et al. 2024): a b-bit weight is b one-bit planes. For every 4 activations
``x[4t .. 4t+3]`` precompute the 16 signed sums ``T_t[c] = sum_l (bit l of c ? +x : -x)``;
then the dot product of those 4 activations with the 4 bits of one plane is a table lookup
by the plane's nibble, done for a whole vector of output rows by one byte shuffle
(``vpshufb`` / ``tbl``). No weight is ever dequantized or multiplied.

Algebra. With codes ``q = sum_i 2^i b_i`` (b_i in {0, 1}) and signs ``s_i = 2 b_i - 1``,
``sum_k x_k q_k = 1/2 sum_i 2^i sum_t T_t[nib_i,t] + (2^bits - 1)/2 * sum_k x_k``, so for the
QLinear weight ``W[k, n] = (q - z[n, g]) * s[n, g]`` (groups g of ``group_size`` along k)::

    y[n] = sum_b wscale[n, g(b)] * tscale[b] * acc[n, b]  +  sum_g woffset[n, g] * xsum[g]
    acc[n, b]   = sum_i 2^i sum_{t in block b} tab[t, nib_i(n, t)]     (exact integers)
    wscale      = s / 2,   woffset = s * ((2^bits - 1)/2 - z)            (packing time)

Tables are quantized to int8 with one scale per block of ``block`` activations (the group, or
256 when groups are longer): ``tscale[b] = max_t sum_l |x_4t+l| / 127``,
``tab = rint(T / tscale)`` (half to even), so |tab| <= 127 and the int16 plane accumulators
of a block cannot overflow for block <= 256 (3 * 127 * 64 < 2^15). Symmetric weights
(``z = 2^(bits-1)``) need no ``woffset``: it is ``-wscale``.

Layout (:func:`pack_lut_weights`, from qcompile's QLinear format ``qcompile.quant``), with R
the rows of one vector (:attr:`qcompile.schedules.lut.LutIsa.rows`: 32 AVX-512, 16 AVX2, 8 NEON;
a vector holds two plane bytes per row) and P = ceil(bits / 2) plane pairs:

* ``planes uint8[n/R, k/8, P, 2R]``: byte ``[r, h, p, 2v + e]`` holds, for row ``n = r*R + v``
  and plane ``i = 2p + e``, the nibble of activations ``8h .. 8h+3`` (low) and ``8h+4 .. 8h+7``
  (high); nibble bit l is bit i of the code at ``k = 4t + l`` (plane ``bits`` of odd bits: 0);
* ``wscale``, ``woffset``: ``float32[n/R, groups, R]``.

After the shuffle, the two bytes of a row (planes 2p, 2p+1) become one int16 ``b0 + 2 b1``
(``pmaddubsw``; ``sadalp`` + ``ssra`` on NEON), so a block accumulates ``P`` int16 vectors per row group,
each at most ``3 * 127 * block/4`` in magnitude.

Kernel arguments (destination passing): ``x f32[1, k], planes, wscale, [woffset], [bias f32[n]],
y f32[1, n]``. Precision: integer parts are exact and equal :func:`lut_gemv_reference`'s;
float parts differ by summation order only (~1e-6 relative). Against the float GEMV the
error is the table rounding, at most :func:`table_error_bound`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx

from qcompile import quant
from qcompile.schedules import lut as sched_lut

__all__ = ["LUT_BITS", "lut_supported", "lut_block", "pack_lut_weights", "lut_tables",
           "lut_gemv_reference", "table_error_bound", "lut_gemv_kernel", "lut_arrays",
           "choose_m1_kernel", "measured_cost", "group_params_by_rows"]

LUT_BITS = (1, 2, 3, 4)
MAX_BLOCK = 256  # activations per table scale (int16 accumulators hold 3 * 127 * block/4)


def _target(target) -> tvm.target.Target:
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def lut_block(k: int, group_size: int) -> int:
    """Activations sharing one table scale: the group, or the largest multiple of 8 <= 256
    dividing it when groups are longer (group_size 0 = one group of k)."""
    group = group_size or k
    return next(b for b in range(min(group, MAX_BLOCK), 0, -8) if group % b == 0)


def lut_supported(k: int, n: int, bits: int, group_size: int, target) -> str | None:
    """None when the LUT kernel fits, else why not (a sentence)."""
    isa = sched_lut.lut_isa(_target(target))
    group = group_size or k
    if isa is None:
        return "the target has no byte shuffle (pshufb / tbl)"
    if bits not in LUT_BITS:
        return f"bits must be one of {LUT_BITS} (got {bits})"
    if k % group or group % 8:
        return f"group size {group} must divide k={k} and be a multiple of 8"
    if n % isa.rows:
        return f"n={n} must be a multiple of {isa.rows} ({isa.name} rows per vector)"
    return None


def lut_gemv_kernel(k: int, n: int, bits: int, group_size: int, symmetric: bool, has_bias: bool,
                    target) -> tirx.PrimFunc:
    """The LUT GEMV y[1, n] = x[1, k] @ W (module docstring); ValueError if it does not fit."""
    target = _target(target)
    reason = lut_supported(k, n, bits, group_size, target)
    if reason:
        raise ValueError(f"no LUT GEMV for k={k} n={n} bits={bits} group_size={group_size}: {reason}")
    group = group_size or k
    builder = sched_lut.LutGemvBuilder(k, n, bits, group, lut_block(k, group_size), symmetric,
                                       has_bias, sched_lut.lut_isa(target))
    return builder.build()


# ---------------------------------------------------------------------------- packing
def pack_lut_weights(packed, scales, zeros, bits: int, group_size: int, k: int, rows: int) -> dict:
    """QLinear weights (``quant.pack_codes`` codes, scales/zeros ``[n, groups]``, zeros None =
    symmetric) -> {"planes", "wscale", "woffset" (None if symmetric)} for ``rows`` per vector."""
    codes = quant.unpack_codes(np.asarray(packed), bits, k)  # [n, k]
    n = codes.shape[0]
    if n % rows or k % 8:
        raise ValueError(f"LUT packing needs n % {rows} == 0 and k % 8 == 0 (n={n}, k={k})")
    pairs = (bits + 1) // 2
    nib = np.zeros((n, k // 4, 2 * pairs), np.uint8)
    nib[:, :, :bits] = _nibbles(codes, bits)  # an odd last plane is paired with zeros
    byte = nib[:, 0::2] | (nib[:, 1::2] << 4)  # [n, k/8, 2 * pairs]
    planes = byte.reshape(n // rows, rows, k // 8, pairs, 2).transpose(0, 2, 3, 1, 4)
    planes = planes.reshape(n // rows, k // 8, pairs, 2 * rows)
    scales = np.asarray(scales, np.float32)
    wscale = scales * np.float32(0.5)
    woffset = None
    if zeros is not None:
        woffset = scales * (np.float32(((1 << bits) - 1) / 2) - np.asarray(zeros, np.float32))
    return {"planes": np.ascontiguousarray(planes), "wscale": group_params_by_rows(wscale, rows),
            "woffset": None if woffset is None else group_params_by_rows(woffset, rows)}


def lut_arrays(lut: dict, bias=None) -> list[np.ndarray]:
    """The kernel's weight-side arguments in order (after x, before y)."""
    out = [lut["planes"], lut["wscale"]]
    return out + ([lut["woffset"]] if lut["woffset"] is not None else []) + ([bias] if bias is not None else [])


def _nibbles(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes[n, k] -> uint8[n, k/4, bits]: bit l of [., t, i] is bit i of codes[., 4t + l]."""
    n, k = codes.shape
    planes = (codes[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1  # [n, k, bits]
    quads = planes.reshape(n, k // 4, 4, bits)
    weights = (1 << np.arange(4, dtype=np.uint8))[None, None, :, None]
    return (quads * weights).sum(axis=2, dtype=np.uint8)


def group_params_by_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """Per-group parameters [n, groups] -> float32 [n / rows, groups, rows]: one vector of
    ``rows`` output rows per group, the layout the row-tiled m = 1 kernels load."""
    n, g = a.shape
    return np.ascontiguousarray(a.reshape(n // rows, rows, g).transpose(0, 2, 1).astype(np.float32))


# ---------------------------------------------------------------------------- reference
def lut_tables(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 tab[k/4, 16], f32 tscale[k/block]) for x[k], in the kernel's exact f32 order."""
    x = np.asarray(x, np.float32).reshape(-1)
    quad = x.reshape(-1, 4)
    signs = np.where((np.arange(16)[:, None] >> np.arange(4)) & 1, np.float32(1), np.float32(-1))
    value = quad[:, None, 0] * signs[None, :, 0]
    for lane in range(1, 4):
        value = value + quad[:, None, lane] * signs[None, :, lane]  # left to right, as the kernel
    mag = np.abs(quad[:, 0])
    for lane in range(1, 4):
        mag = mag + np.abs(quad[:, lane])
    amax = mag.reshape(-1, block // 4).max(axis=1)
    tscale = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    tab = np.rint(value * np.repeat(inv, block // 4)[:, None]).astype(np.int8)
    return tab, tscale


def lut_gemv_reference(x, packed, scales, zeros, bits: int, group_size: int, bias=None) -> np.ndarray:
    """numpy LUT GEMV on QLinear weights: the kernel's integers exactly, f32 [1, n] out."""
    x = np.asarray(x, np.float32).reshape(-1)
    k = x.size
    group = group_size or k
    block = lut_block(k, group_size)
    tab, tscale = lut_tables(x, block)
    nib = _nibbles(quant.unpack_codes(np.asarray(packed), bits, k), bits).astype(np.int64)
    n = nib.shape[0]
    rows = np.arange(k // 4)[None, :]
    acc = np.zeros((n, k // block), np.int64)
    for i in range(bits):
        looked = tab.astype(np.int64)[rows, nib[:, :, i]]  # [n, k/4]
        acc += looked.reshape(n, k // block, block // 4).sum(axis=2) << i
    scales = np.asarray(scales, np.float64)
    g_of_b = np.arange(k // block) * block // group
    y = (0.5 * scales[:, g_of_b] * tscale[None, :] * acc).sum(axis=1)
    zero = np.float64(1 << (bits - 1)) if zeros is None else np.asarray(zeros, np.float64)
    xsum = x.astype(np.float64).reshape(-1, group).sum(axis=1)
    y += (scales * (((1 << bits) - 1) / 2 - zero) * xsum[None, :]).sum(axis=1)
    if bias is not None:
        y += np.asarray(bias, np.float64)
    return y.astype(np.float32)[None, :]


def table_error_bound(x, scales, bits: int, group_size: int) -> np.ndarray:
    """Worst-case |LUT - exact GEMV| per output (float64 [1, n]) from table rounding alone:
    each lookup is off by at most tscale/2, weighted by s/2 * 2^i over the planes."""
    x = np.asarray(x, np.float32).reshape(-1)
    k = x.size
    group, block = group_size or k, lut_block(k, group_size)
    _, tscale = lut_tables(x, block)
    g_of_b = np.arange(k // block) * block // group
    per_block = 0.5 * np.abs(np.asarray(scales, np.float64))[:, g_of_b] * ((1 << bits) - 1) \
        * (block // 4) * tscale[None, :].astype(np.float64) / 2
    return per_block.sum(axis=1)[None, :]


# ---------------------------------------------------------------------------- selection
def choose_m1_kernel(k: int, n: int, bits: int, group_size: int, target, measure=None) -> str:
    """Which m = 1 kernel a QLinear should use: "lut" (this module) or "dequant" (gemv_kernels).

    ``measure``: optional ``callable(kind) -> seconds`` (:func:`measured_cost`, or any timing);
    the faster wins. Without it, an estimate of the work per weight (both kernels stream the
    same packed bytes): ``bits * LUT_COST / R`` for LUT (work per plane, R rows per shuffle)
    against ``DEQUANT_COST / lanes`` for the float dequant kernel (f32 lanes). The relative
    constants are calibrated on the AVX-512 host (tools/bench_lut.py, 4096x4096 g128: LUT
    took 0.17x the dequant time at 4 bits, 0.13x at 2 bits); with them LUT wins wherever it
    is offered (1-4 bits, a byte shuffle), as T-MAC reports on ARM and x86 alike.
    """
    if lut_supported(k, n, bits, group_size, target) is not None:
        return "dequant"
    if measure is not None:
        return "lut" if measure("lut") < measure("dequant") else "dequant"
    from qcompile.schedules.llvm import cpu_params

    target = _target(target)
    lut_cost = bits * LUT_COST / sched_lut.lut_isa(target).rows
    dequant_cost = DEQUANT_COST / max(1, cpu_params(target).lanes)
    return "lut" if lut_cost <= dequant_cost else "dequant"


LUT_COST = 1.0  # relative work per weight and plane for one shuffle row
DEQUANT_COST = 10.0  # relative work per weight for one f32 lane


def measured_cost(k: int, n: int, bits: int, group_size: int, symmetric: bool, target, repeats: int = 20):
    """A ``measure`` for :func:`choose_m1_kernel`: builds both kernels for this shape, times each
    (median of ``repeats`` calls after warm-up, :func:`qcompile.timing.median_ms`) on random
    weights once, and returns ``kind -> seconds``. Runs in the calling process: call it when
    the machine is otherwise idle (compile time), not in tests that assert speed."""
    from qcompile.timing import median_ms

    from .kernels import qlinear_kernel

    target = _target(target)
    rng = np.random.default_rng(0)
    groups = k // (group_size or k)
    packed = quant.pack_codes(rng.integers(0, 1 << bits, (n, k), dtype=np.uint8), bits)
    scales = rng.random((n, groups), dtype=np.float32)
    zeros = None if symmetric else rng.integers(0, 1 << bits, (n, groups)).astype(np.float32)
    x, y = rng.standard_normal((1, k), dtype=np.float32), np.zeros((1, n), np.float32)
    lut = pack_lut_weights(packed, scales, zeros, bits, group_size, k, sched_lut.lut_isa(target).rows)
    builds = {"lut": (lut_gemv_kernel(k, n, bits, group_size, symmetric, False, target), lut_arrays(lut)),
              "dequant": (qlinear_kernel(1, k, n, bits, group_size, symmetric, False, target),
                          [packed, scales] + ([zeros] if zeros is not None else []))}
    seconds = {}
    for kind, (func, weights) in builds.items():
        mod = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        args = [tvm.runtime.tensor(a) for a in (x, *weights, y)]
        seconds[kind] = median_ms(lambda: mod.mod["main"](*args), repeats) * 1e-3
    return seconds.__getitem__
