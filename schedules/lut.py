"""Loop nest of the T-MAC style lookup-table (LUT) GEMV, one builder for x86 and aarch64.

No graph rewrites live here. :func:`lut_isa` picks the byte-shuffle instruction of a target
(:class:`LutIsa`: how many output rows one vector covers and which LLVM intrinsic looks 16-entry
int8 tables up); :class:`LutGemvBuilder` emits the whole kernel with the TIR IR builder (the
loop nest is the schedule, as in :mod:`qcompile.backends.gemv_kernels`), the same for every
ISA. Data layout and algebra: :mod:`qcompile.backends.lut_kernels` (the contract).

* AVX-512BW: ``vpshufb zmm`` (``llvm.x86.avx512.pshuf.b.512``) + ``vpmaddubsw``, 32 rows per vector;
* AVX2: ``vpshufb ymm`` + ``vpmaddubsw ymm``, 16 rows;
* SSSE3: ``pshufb xmm`` + ``pmaddubsw xmm``, 8 rows;
* aarch64 NEON: ``tbl v.16b, {v.16b}, v.16b`` (``llvm.aarch64.neon.tbl1.v16i8``) + ``sadalp``/``ssra``, 8 rows.

x86 shuffles look up within each 128-bit lane, so the 16-byte table is broadcast to every
lane (a ``Shuffle`` concat, i.e. ``vbroadcasti32x4``). The index vector holds, for R rows, the
4-bit indices of two planes (2p, 2p+1) of the same 4 activations, side by side; after the
lookup each byte pair becomes one int16 ``b0 + 2 b1`` (``pmaddubsw`` with u8 weights (1, 2),
or ``saddlp`` + ``ssra`` on NEON), so no separate int8 -> int16 widening is needed.

Loop nest (one call, m = 1; V = 2R bytes per vector, P = ceil(bits / 2) plane pairs)::

    prologue (serial): int8 tables tab[k/4, 16], table scale per block, x sum per group
    parallel over tasks of several R-row vectors:
      for each vector nb:
        facc[R] f32 = 0
        for block b:                               # `block` activations, one table scale
          acc16[P, R] = 0
          for h in block / 8:                      # one byte = indices into two tables
            t0, t1 = tables 2h, 2h+1 (broadcast to V bytes)
            for pair p: w = planes[nb, h, p, :]    # V bytes
              acc16[p] += pair(lookup(t0, w & 15)) + pair(lookup(t1, w >> 4))
          facc += f32(sum_p int32(acc16[p]) << 2p) * wscale[nb, g(b), :] * tscale[b]
        facc += woffset[nb, g, :] * xsum[g] for each group g  (or -wscale: symmetric)
        y[nb*R : nb*R+R] = facc (+ bias)
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script.ir_builder import tirx as T

from qcompile.backends.gemv_kernels import _bcast, _build, _load, _store, _vec

__all__ = ["LutIsa", "lut_isa", "LutGemvBuilder", "TABLE"]

TABLE = 16  # entries of one table: every sign pattern of 4 activations
ROWS_PER_TASK = 256  # output rows per parallel task (a multiple of every V)


@dataclass(frozen=True)
class LutIsa:
    """One target's table lookup: ``lanes`` int8 results per ``intrin`` (byte shuffle), then
    byte pairs (planes 2p, 2p+1 of one row) combined into int16 ``b0 + 2 b1`` by ``pair_intrin``:
    ``pair`` "pmaddubsw" (u8 weights (1, 2) times the bytes, x86) or "saddlp" (pairwise
    ``b0 + b1``, plus ``b1`` by an arithmetic shift: ``saddlp``/``sadalp`` + ``ssra``, NEON)."""

    name: str
    lanes: int
    intrin: str
    pair: str
    pair_intrin: str

    @property
    def rows(self) -> int:
        """Output rows per vector (two plane bytes per row)."""
        return self.lanes // 2


_X86 = (("avx512bw", LutIsa("avx512bw", 64, "llvm.x86.avx512.pshuf.b.512", "pmaddubsw",
                             "llvm.x86.avx512.pmaddubs.w.512")),
        ("avx2", LutIsa("avx2", 32, "llvm.x86.avx2.pshuf.b", "pmaddubsw", "llvm.x86.avx2.pmadd.ub.sw")),
        ("ssse3", LutIsa("ssse3", 16, "llvm.x86.ssse3.pshuf.b.128", "pmaddubsw", "llvm.x86.ssse3.pmadd.ub.sw.128")))
NEON = LutIsa("neon", 16, "llvm.aarch64.neon.tbl1.v16i8", "saddlp", "llvm.aarch64.neon.saddlp.v8i16.v16i8")


def lut_isa(target: tvm.target.Target) -> LutIsa | None:
    """The widest byte shuffle of an llvm ``target``, or None (no LUT kernel there)."""
    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())
    if triple.startswith(("aarch64", "arm64")):
        return NEON
    if triple.startswith(("x86_64", "i686", "i386")):
        has = tvm.target.codegen.target_has_features
        return next((isa for feature, isa in _X86 if has([feature], target)), None)
    return None


class LutGemvBuilder:
    """Emits the LUT GEMV for one shape and ISA (see the module docstring)."""

    def __init__(self, k: int, n: int, bits: int, group: int, block: int, symmetric: bool,
                 has_bias: bool, isa: LutIsa):
        self.k, self.n, self.bits, self.group, self.block = k, n, bits, group, block
        self.symmetric, self.has_bias, self.isa = symmetric, has_bias, isa
        self.V, self.R, self.pairs = isa.lanes, isa.rows, (bits + 1) // 2
        self.groups, self.nblocks, self.tables = k // group, k // block, k // 4

    def build(self) -> tirx.PrimFunc:
        return _build(self)

    # -------------------------------------------------------------------- arguments
    def _declare(self):
        k, n, R, G = self.k, self.n, self.R, self.groups
        self.x = T.arg("x", T.buffer((1, k), "float32"))
        self.planes = T.arg("planes", T.buffer((n // R, k // 8, self.pairs, self.V), "uint8"))
        self.ws = T.arg("wscale", T.buffer((n // R, G, R), "float32"))
        self.wo = None if self.symmetric else T.arg("woffset", T.buffer((n // R, G, R), "float32"))
        self.bias = T.arg("bias", T.buffer((n,), "float32")) if self.has_bias else None
        self.y = T.arg("y", T.buffer((1, n), "float32"))

    def emit(self):
        self._declare()
        tab = T.decl_buffer((self.tables * TABLE,), "int8")
        tscale = T.decl_buffer((self.nblocks,), "float32")
        xsum = T.decl_buffer((self.groups,), "float32")
        self._tables(tab, tscale)
        self._xsum(xsum)
        R, vectors = self.R, self.n // self.R
        per = next(p for p in (ROWS_PER_TASK // R, 2, 1) if vectors % p == 0)
        with T.parallel(0, vectors // per) as task:
            acc16 = T.decl_buffer((self.pairs * R,), "int16", scope="local")
            facc = T.decl_buffer((R,), "float32", scope="local")
            with T.serial(0, per) as inner:
                self._rows(task * per + inner, tab, tscale, xsum, acc16, facc)

    # -------------------------------------------------------------------- prologue
    def _tables(self, tab, tscale):
        """tab[t, c] = round(sum_l (bit l of c ? x : -x)[4t + l] / tscale[block of t]), int8.

        Summed left to right in f32 (the numpy reference does the same, so tables match bit
        for bit); tscale = max over the block's tables of sum |x| / 127, hence |tab| <= 127.
        """
        x, per_block = self.x, self.block // 4
        zero = tirx.const(0.0, "float32")
        with T.serial(0, self.nblocks) as b:
            amax = T.decl_buffer((1,), "float32", scope="local")
            T.buffer_store(amax, zero, [0])
            with T.serial(0, per_block) as t:
                base = (b * per_block + t) * 4
                total = tirx.abs(x[0, base])
                for lane in range(1, 4):
                    total = total + tirx.abs(x[0, base + lane])
                T.buffer_store(amax, tirx.max(amax[0], total), [0])
            T.buffer_store(tscale, amax[0] / tirx.const(127.0, "float32"), [b])
            inv = tirx.Select(amax[0] > zero, tirx.const(127.0, "float32") / amax[0], zero)
            with T.serial(0, per_block) as t:
                base = (b * per_block + t) * 4
                with T.serial(0, TABLE) as c:
                    value = None
                    for lane in range(4):
                        xv = x[0, base + lane]
                        term = tirx.Select((c >> lane) & 1 == 1, xv, -xv)
                        value = term if value is None else value + term
                    code = tirx.Cast("int8", tirx.nearbyint(value * inv))
                    T.buffer_store(tab, code, [(b * per_block + t) * TABLE + c])

    def _xsum(self, xsum):
        with T.serial(0, self.groups) as g:
            T.buffer_store(xsum, tirx.const(0.0, "float32"), [g])
            with T.serial(0, self.group) as r:
                T.buffer_store(xsum, xsum[g] + self.x[0, g * self.group + r], [g])

    # -------------------------------------------------------------------- main loop
    def _table(self, tab, t):
        """Table ``t`` as V bytes (16 entries, repeated per 128-bit lane)."""
        vec = tab.vload([t * TABLE], _vec("int8", TABLE))
        reps = self.V // TABLE
        return vec if reps == 1 else tirx.Shuffle([vec] * reps, list(range(self.V)))

    def _lookup(self, table, index):
        return tirx.call_llvm_pure_intrin(_vec("int8", self.V), self.isa.intrin, table, index)

    def _pair(self, looked, full: bool):
        """int16[R]: ``b0 + 2 * b1`` of each byte pair (b1 ignored unless ``full``)."""
        i16, R = _vec("int16", self.R), self.R
        eight = _bcast(tirx.const(8, "int16"), R)
        word = tirx.call_intrin(i16, "tirx.reinterpret", looked)
        if self.isa.pair == "pmaddubsw":
            # little endian: int16 1 + (2 << 8) is the byte pair (1, 2); 1 is (1, 0)
            pattern = _bcast(tirx.const(1 + (2 << 8) if full else 1, "int16"), R)
            weights = tirx.call_intrin(_vec("uint8", self.V), "tirx.reinterpret", pattern)
            return tirx.call_llvm_pure_intrin(i16, self.isa.pair_intrin, weights, looked)
        if not full:
            return (word << eight) >> eight
        return tirx.call_llvm_pure_intrin(i16, self.isa.pair_intrin, looked) + (word >> eight)

    def _rows(self, nb, tab, tscale, xsum, acc16, facc):
        V, R = self.V, self.R
        i8 = _vec("int8", V)
        _store(facc, _bcast(tirx.const(0.0, "float32"), R), 0, R)
        bytes_per_block = self.block // 8
        with T.serial(0, self.nblocks) as b:
            for p in range(self.pairs):
                _store(acc16, _bcast(tirx.const(0, "int16"), R), p * R, R)
            with T.serial(0, bytes_per_block) as h:
                hh = b * bytes_per_block + h
                t0, t1 = self._table(tab, 2 * hh), self._table(tab, 2 * hh + 1)
                for p in range(self.pairs):
                    full = 2 * p + 1 < self.bits
                    w = tirx.BufferLoad(self.planes, [nb, hh, p, tirx.Ramp(0, 1, V)])
                    lo = w & _bcast(tirx.const(15, "uint8"), V)
                    hi = w >> _bcast(tirx.const(4, "uint8"), V)
                    r0 = self._lookup(t0, tirx.call_intrin(i8, "tirx.reinterpret", lo))
                    r1 = self._lookup(t1, tirx.call_intrin(i8, "tirx.reinterpret", hi))
                    total = self._pair(r0, full) + self._pair(r1, full)
                    _store(acc16, _load(acc16, p * R, R) + total, p * R, R)
            self._flush_block(nb, b, tscale, acc16, facc)
        self._finish(nb, xsum, facc)

    def _flush_block(self, nb, b, tscale, acc16, facc):
        R, i32 = self.R, _vec("int32", self.R)
        acc = tirx.Cast(i32, _load(acc16, 0, R))
        for p in range(1, self.pairs):
            pair = tirx.Cast(i32, _load(acc16, p * R, R))
            acc = acc + (pair << _bcast(tirx.const(2 * p, "int32"), R))
        g = b * self.block // self.group
        ws = tirx.BufferLoad(self.ws, [nb, g, tirx.Ramp(0, 1, R)])
        scaled = tirx.Cast(_vec("float32", R), acc) * (ws * _bcast(tscale[b], R))
        _store(facc, _load(facc, 0, R) + scaled, 0, R)

    def _finish(self, nb, xsum, facc):
        R = self.R
        with T.serial(0, self.groups) as g:
            ws = tirx.BufferLoad(self.ws, [nb, g, tirx.Ramp(0, 1, R)])
            off = -ws if self.wo is None else tirx.BufferLoad(self.wo, [nb, g, tirx.Ramp(0, 1, R)])
            _store(facc, _load(facc, 0, R) + off * _bcast(xsum[g], R), 0, R)
        value = _load(facc, 0, R)
        if self.bias is not None:
            value = value + self.bias.vload([nb * R], _vec("float32", R))
        T.buffer_store(self.y, value, [0, tirx.Ramp(nb * R, 1, R)])

