"""The host (x86-64 llvm) target: CPU detection, the Relax pipeline, build and export.

Pipeline (:func:`relax_pipeline`), in order:

1. library dispatch and ``LegalizeOps``: every ``relax.op.*`` becomes a TIR PrimFunc;
2. ``AnnotateTIROpPattern``, ``FoldConstant``, ``FuseOps``, ``FuseTIR``: elementwise
   chains and reduction epilogues become one PrimFunc each. Kernel PrimFuncs from
   :mod:`qcompile.backends.kernels` carry ``op_pattern`` = opaque and stay whole;
3. scheduling of every PrimFunc not marked ``tirx.is_scheduled``, first rule that
   applies: :class:`RowReduction` (softmax, layer norm: rows in parallel, vectorised
   rfactor reductions), dlight's CPU ``Reduction`` and ``GEMV``, then
   :class:`CPUFallback` (inline, parallelise outer loops, vectorise the innermost one);
4. the default CPU dataflow lowering and finalisation passes.

Before 1, :data:`FastMath` swaps exp/tanh/sigmoid/gelu_tanh for TVM's vectorisable
polynomial versions (libm calls per lane were 15-60x slower). The target sets
``fast-math-reassoc`` only (never ``nnan``/``ninf``: IsNaN and -inf masks must work).

Invariant: the built executable's ``main`` has the signature that
:func:`qcompile.backends.relax_lowering.lower_graph` documents (tuple output).
"""

from __future__ import annotations

import math
import os

import tvm
from tvm import relax, s_tir, tirx, topi
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight

from ..relax_lowering import lower_graph

__all__ = ["host_target", "relax_pipeline", "front_passes", "schedule_passes", "build", "export_library", "CPUFallback", "RowReduction", "FastMath"]

PARALLEL_MIN_ELEMENTS = 8192  # below this a parallel launch costs more than it saves


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """The llvm target of this machine: its CPU (``-mcpu``) and its core count."""
    cores = int(num_cores or os.cpu_count() or 1)
    return tvm.target.Target({
        "kind": "llvm",
        "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
        "num-cores": cores,
        # lets LLVM vectorise float sum reductions (layer norm, softmax); no nnan/ninf:
        # IsNaN and inf masks must keep their meaning
        "fast-math-reassoc": True,
    })


def _vector_lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    try:
        bits = int(tvm.target.codegen.llvm_get_vector_width(target))
    except Exception:  # pylint: disable=broad-except  (unknown cpu: assume SSE)
        bits = 128
    return max(1, (bits if bits > 0 else 128) // dtype_bits)


def _schedule_errors_decline(apply):
    """A rule whose primitives refuse a function declines it (returns None) instead of failing."""

    def wrapped(self, func, target, tunable):
        try:
            return apply(self, func, target, tunable)
        except s_tir.schedule.ScheduleError:
            return None

    return wrapped


class CPUFallback(dlight.ScheduleRule):
    """Inline everything inlinable, then per remaining block: vectorise a chunk of the
    innermost spatial loop (injective blocks only), fuse the other spatial loops and
    parallelise them when the block is large enough to pay for the thread launch.

    The innermost loop is split rather than fused with the others so that per-row index
    arithmetic (gather rows, transposes) stays outside the vector loop.
    """

    @_schedule_errors_decline
    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = dlight.analysis.normalize_prim_func(sch)
        if infos is None:
            return None
        infos = dlight.base.try_inline(sch, infos)
        lanes = _vector_lanes(target)
        for info in infos:
            block = info.block_rv
            loops = sch.get_loops(block)
            kinds = info.dom_kind()
            if len(loops) != len(kinds) or "O" in kinds:
                continue
            s_loops = [l for l, k in zip(loops, kinds) if k == "S"]
            r_loops = [l for l, k in zip(loops, kinds) if k == "R"]
            if not s_loops:
                continue
            sch.reorder(*s_loops, *r_loops)
            work = math.prod(_extent(sch, l) for l in loops)
            outer = s_loops
            vec = math.gcd(_extent(sch, s_loops[-1]), lanes)
            if not r_loops and vec > 1:
                chunk, inner = sch.split(s_loops[-1], [None, vec])
                sch.vectorize(inner)
                outer = s_loops[:-1] + [chunk]
            fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            if work >= PARALLEL_MIN_ELEMENTS and _extent(sch, fused) > 1:
                sch.parallel(fused)
            if r_loops:
                sch.decompose_reduction(block, r_loops[0])
        return sch


class RowReduction(dlight.ScheduleRule):
    """Row-wise normalisations (softmax, layer norm, their fused epilogues) on the CPU.

    Pattern: every reduction block reduces over its trailing loops after ``p`` leading
    spatial loops that all blocks share (the rows), and the last block is injective.
    Schedule: inline single-consumer elementwise blocks; ``rfactor`` each reduction over a
    vector-wide slice of its reduce axis (so the accumulation is a vector of partial
    sums/maxima instead of a latency-bound scalar chain); parallelise the fused rows of the
    last block; ``compute_at`` everything else under that row loop; vectorise inner loops.
    """

    @_schedule_errors_decline
    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        lanes = _vector_lanes(target)
        sch = s_tir.Schedule(func)
        infos = dlight.analysis.normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or not infos[-1].is_injective():
            return None
        rows = _row_axes(infos)
        if rows is None:
            return None
        _inline_single_consumer(sch, infos[:-1])
        reductions = []
        for info in dlight.analysis.normalize_prim_func(sch)[:-1] or []:
            if info.is_injective():
                continue
            loops = sch.get_loops(info.block_rv)
            if len(loops) != rows + 1 or _extent(sch, loops[-1]) % lanes:
                return None
            _, inner = sch.split(loops[-1], [None, lanes])
            reductions.append(sch.rfactor(inner, factor_axis=0))
        last = sch.get_child_blocks(sch.get_sblock("root"))[-1]
        loops = sch.get_loops(last)
        row = sch.fuse(*loops[:rows])
        sch.parallel(row)
        _vectorize_tail(sch, sch.get_loops(last)[1:], lanes)
        for block in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
            sch.compute_at(block, row, preserve_unit_loops=True)
        for rf in reductions:  # loops under the row: (lane, unit row loops..., chunk)
            under = sch.get_loops(rf)[1:]
            lane, chunk = under[0], under[-1]
            sch.reorder(chunk, lane)
            sch.vectorize(lane)  # before decompose_reduction, else "no compact dataflow"
            sch.vectorize(sch.get_loops(sch.decompose_reduction(rf, chunk))[-1])
        for block in sch.get_child_blocks(row):
            if all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars):
                inner = sch.get_loops(block)[1:]
                if inner and all(sch.get(l).kind == tirx.ForKind.SERIAL for l in inner):
                    _vectorize_tail(sch, inner, lanes)
        return sch


def _row_axes(infos) -> int | None:
    """Number of leading spatial loops shared by every reduction block, if it is one number."""
    counts = {len(k) - len(k.lstrip("S")) for k in (i.dom_kind() for i in infos if not i.is_injective())}
    if len(counts) != 1:
        return None
    rows = counts.pop()
    shapes = {tuple(int(d) for d in i.dom()[:rows]) for i in infos if len(i.dom_kind()) >= rows}
    return rows if rows > 0 and len(shapes) == 1 else None


def _inline_single_consumer(sch, infos) -> None:
    for info in reversed(infos):
        if info.is_injective() and len(sch.get_consumers(info.block_rv)) == 1:
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # pylint: disable=broad-except  (not inlinable: keep the block)
                pass


def _vectorize_tail(sch, loops, lanes) -> None:
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    vec = math.gcd(_extent(sch, fused), lanes)
    if vec > 1:
        _, inner = sch.split(fused, [None, vec])
        sch.vectorize(inner)


@relax.expr_functor.mutator
class _FastMathMutator(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = getattr(call.op, "name", "")
        if name not in _FAST_MATH or str(call.args[0].ty.dtype) != "float32":
            return call
        if name == "relax.nn.softmax":
            return self.builder_.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis))
        return self.builder_.call_te(_FAST_MATH[name], call.args[0])


def _gelu(x):
    return topi.multiply(x, topi.add(topi.multiply(topi.fast_erf(topi.multiply(x, 0.7071067811865476)), 0.5), 0.5))


def _gelu_tanh(x):
    cube = topi.multiply(topi.multiply(topi.multiply(x, x), x), 0.044715)
    inner = topi.multiply(topi.add(x, cube), 0.7978845608028654)
    return topi.multiply(topi.multiply(x, 0.5), topi.add(topi.fast_tanh(inner), 1.0))


def _sigmoid(x):
    return topi.divide(1.0, topi.add(topi.fast_exp(topi.negative(x)), 1.0))


_FAST_MATH = {
    "relax.exp": topi.fast_exp, "relax.erf": topi.fast_erf, "relax.tanh": topi.fast_tanh,
    "relax.sigmoid": _sigmoid, "relax.nn.gelu": _gelu, "relax.nn.gelu_tanh": _gelu_tanh,
    "relax.nn.softmax": None,
}


@tvm.transform.module_pass(opt_level=0, name="QCompileFastMath")
def FastMath(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802  (a pass, named like TVM's)
    """Replace float32 exp/erf/tanh/sigmoid/gelu/softmax by TVM's polynomial versions.

    LLVM lowers ``expf``/``erff`` to one libm call per lane (15-60x slower than the
    vectorised polynomials); the polynomials are within 4e-6 relative error (exp) and
    5e-7 absolute (erf, tanh) of float64 over the float range.
    """
    mutator = _FastMathMutator(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def front_passes(target) -> list:
    """Steps 1-2 of the pipeline (fast math, dispatch, legalize, fuse): what schedules see."""
    return ([FastMath] + cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
            + [relax.transform.DeadCodeElimination()])


def schedule_passes(target) -> list:
    """Step 3: the rule-based schedules for every PrimFunc not yet marked scheduled."""
    return [
        dlight.ApplyDefaultSchedule(RowReduction(), dlight.cpu.Reduction(), dlight.cpu.GEMV(), CPUFallback()),
    ]


def relax_pipeline(target: tvm.target.Target, before_schedules=()) -> tvm.transform.Pass:
    """The whole Relax-to-VM pipeline of this target, as one module pass.

    ``before_schedules``: passes run between fusion and the rule-based schedules (e.g. a
    tuning database applying its records, see :mod:`.tuning`)."""

    @tvm.transform.module_pass(opt_level=0, name="QCompileLLVMPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                front_passes(target)
                + list(before_schedules)
                + schedule_passes(target)
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def build(graph, target: tvm.target.Target | None = None):
    """Lower ``graph`` and compile it for ``target`` (default: :func:`host_target`)."""
    target = target or host_target()
    mod = lower_graph(graph, target)
    return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))


def export_library(executable, path, cc: str | None = None) -> str:
    """Write the executable as a shared library (``model.so``) at ``path``, linked by ``cc``
    (default: the host compiler; cross targets pass their own)."""
    path = os.fspath(path)
    executable.export_library(path, **({"cc": cc} if cc else {}))
    return path
