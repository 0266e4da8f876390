"""Hand schedules for the linear-algebra kernels of ``qcompile.backends.kernels`` on CPUs (llvm).

No graph rewrites live here: each function takes a ``tvm.s_tir.Schedule`` of a PrimFunc built by
``backends/kernels.py`` (block names are part of that contract) and transforms loops only.

Every per-target decision is one :class:`CpuParams` chosen by :func:`cpu_params`, parameterized by
the f32 vector width and the register count:

* AVX-512 (x86 with ``avx512f``): 16 lanes, 32 registers -> 8 x 48 accumulator tile (24 zmm);
* AVX2 / plain SSE x86: 8 or 4 lanes, 16 registers -> 6 x 16 (AVX2) or 6 x 8 (SSE) tile;
* NEON (aarch64): 4 lanes, 32 registers -> 8 x 12 tile;
* anything else: lanes = 1 (a scalar tile; LLVM may still auto-vectorize).

The GEMM schedule (shared by linear, qlinear and batch_matmul): output rows are split into
``mr``-row blocks and columns into ``nr = nr_vecs * lanes`` panels; the loop nest is
``batch, column panel, row block, k, mr (unrolled), nr_vecs (unrolled), lanes (vectorized)``, the
``mr x nr`` accumulator lives in a "local" buffer (registers) and the A element is broadcast.
Column panels are the outer loop so a K x nr panel of B stays in L2 while all row blocks stream
past it. For qlinear the dequantized K x nr panel is computed at the column-panel level (inside
the parallel loop) into a per-thread buffer, so the full fp32 weight never exists.
Rows or columns that do not divide the tile are handled with predicates (correct, slower).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm

__all__ = ["CpuParams", "cpu_params", "schedule_gemm", "schedule_dequant_panel", "schedule_gather"]


@dataclass(frozen=True)
class CpuParams:
    """Register-tile parameters for one CPU target (f32 lanes, tile rows, vectors per tile row)."""

    lanes: int
    mr: int
    nr_vecs: int


def cpu_params(target: tvm.target.Target) -> CpuParams:
    """Pick the register tile for ``target`` from its vector features (see module docstring)."""
    if target.kind.name != "llvm":
        return CpuParams(lanes=1, mr=4, nr_vecs=4)
    has = tvm.target.codegen.target_has_features
    triple = str(target.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())
    if triple.startswith(("x86_64", "i686", "i386")):
        if has(["avx512f"], target):
            return CpuParams(lanes=16, mr=8, nr_vecs=3)
        if has(["avx2"], target) or has(["avx"], target):
            return CpuParams(lanes=8, mr=6, nr_vecs=2)
        return CpuParams(lanes=4, mr=6, nr_vecs=2)
    if triple.startswith(("aarch64", "arm64")):
        return CpuParams(lanes=4, mr=8, nr_vecs=3)
    return CpuParams(lanes=1, mr=4, nr_vecs=4)


@dataclass(frozen=True)
class _Tile:
    mr: int
    lanes: int  # 1 when the column count is not a multiple of the vector width
    nr_vecs: int

    @property
    def nr(self) -> int:
        return self.lanes * self.nr_vecs


def _pick_tile(m: int, n: int, p: CpuParams) -> _Tile:
    lanes = p.lanes if p.lanes > 1 and n % p.lanes == 0 else 1
    if lanes > 1:
        nr_vecs = next(c for c in range(p.nr_vecs, 0, -1) if n % (c * lanes) == 0)
    else:
        nr_vecs = min(n, p.nr_vecs * max(p.lanes, 4))
    if m <= p.mr:
        mr = m
    else:
        mr = next((r for r in range(p.mr, (p.mr + 1) // 2 - 1, -1) if m % r == 0), p.mr)
    return _Tile(mr=mr, lanes=lanes, nr_vecs=nr_vecs)


def _split_vector(sch, loop, lanes: int):
    """Split ``loop`` into (outer, lanes) and vectorize the inner part (no-op for lanes 1)."""
    if lanes == 1:
        return loop, None
    outer, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    return outer, inner


def schedule_gemm(sch, block: str, epilogue: str, m: int, n: int, params: CpuParams,
                  panel: str | None = None, batched: bool = False) -> None:
    """Register-tile the reduction block ``block`` (loops [b,] i, j, k) and its ``epilogue``.

    ``epilogue`` is the single consumer of ``block``'s output (bias add, or a cache_write copy);
    ``block``'s output becomes the local accumulator. ``panel`` (optional) is a producer of B that
    is computed per column panel (qlinear's dequantization); it is then scheduled with
    :func:`schedule_dequant_panel` by the caller.
    """
    tile = _pick_tile(m, n, params)
    mm = sch.get_sblock(block)
    loops = sch.get_loops(mm)
    b, (i, j, r) = (loops[0] if batched else None), loops[-3:]
    io, ii = sch.split(i, [None, tile.mr])
    if tile.lanes > 1:
        jo, jv2, jv = sch.split(j, [None, tile.nr_vecs, tile.lanes])
    else:
        jo, jv2 = sch.split(j, [None, tile.nr])
        jv = None
    inner = [x for x in (ii, jv2, jv) if x is not None]
    sch.reorder(jo, io, r, *inner)
    epi = sch.get_sblock(epilogue)
    sch.reverse_compute_at(epi, io)
    sch.set_scope(mm, 0, "local")
    if panel is not None:
        sch.compute_at(sch.get_sblock(panel), jo)
        sch.parallel(sch.fuse(b, jo) if batched else jo)
    else:
        sch.parallel(sch.fuse(*[x for x in (b, jo, io) if x is not None]))
    sch.unroll(ii)
    sch.unroll(jv2)
    if jv is not None:
        sch.vectorize(jv)
    init = sch.decompose_reduction(mm, r)
    _vectorize_tile(sch, init, tile)
    _vectorize_tile(sch, epi, tile)


def _vectorize_tile(sch, block, tile: _Tile) -> None:
    """Unroll the row loop and vectorize the column loop of a 2-D mr x nr tile block."""
    *_, row, col = sch.get_loops(block)
    sch.unroll(row)
    outer, _ = _split_vector(sch, col, tile.lanes)
    sch.unroll(outer)


def schedule_dequant_panel(sch, block: str, n: int, params: CpuParams, group: int,
                           codes_per_step: int) -> None:
    """Schedule the dequant panel (loops k, j after ``compute_at``) vectorized along columns.

    k is split into groups of ``group`` (scale/zero loads are then invariant in the inner loop)
    and ``codes_per_step`` codes sharing the same packed bytes (unrolled, so the gathered byte
    loads are shared by common-subexpression elimination).
    """
    lanes = params.lanes if params.lanes > 1 and n % params.lanes == 0 else 1
    blk = sch.get_sblock(block)
    k, j = sch.get_loops(blk)[-2:]
    kg, kr = sch.split(k, [None, group])
    if codes_per_step > 1 and group % codes_per_step == 0:
        kb, ke = sch.split(kr, [None, codes_per_step])
    else:
        kb, ke = kr, None
    if lanes > 1:
        jo, jv = sch.split(j, [None, lanes])
        sch.reorder(kg, jo, kb, *([ke] if ke is not None else []), jv)
        sch.vectorize(jv)
    else:
        sch.reorder(kg, kb, *([ke] if ke is not None else []), j)
    if ke is not None:
        sch.unroll(ke)


def schedule_gather(sch, block: str, rows: int, d: int, params: CpuParams) -> None:
    """Row-parallel embedding dequant-gather (small: rows x d elements; LLVM vectorizes d).

    ``d`` and ``params`` are unused for now; they keep the signature stable for a vectorized
    variant (codes unpacked along d need a byte-level shuffle TIR does not express directly).
    """
    del d, params
    row = sch.get_loops(sch.get_sblock(block))[0]
    if rows > 1:
        sch.parallel(row)
