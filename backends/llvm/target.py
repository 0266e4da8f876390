"""The host (x86-64 llvm) target: CPU detection, the Relax pipeline, build and export.

Pipeline (:func:`relax_pipeline`), in order:

1. library dispatch and ``LegalizeOps``: every ``relax.op.*`` becomes a TIR PrimFunc;
2. ``AnnotateTIROpPattern``, ``FoldConstant``, ``FuseOps``, ``FuseTIR``: elementwise
   chains and reduction epilogues become one PrimFunc each. Kernel PrimFuncs from
   :mod:`qcompile.backends.kernels` carry ``op_pattern`` = opaque and stay whole;
3. scheduling of every PrimFunc not marked ``tirx.is_scheduled``: dlight's CPU
   ``Reduction`` rule (softmax, layer norm) then :class:`CPUFallback`
   (inline, parallelise the spatial loops, vectorise the innermost one);
4. the default CPU dataflow lowering and finalisation passes.

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

__all__ = ["host_target", "relax_pipeline", "build", "export_library", "CPUFallback", "FastMath"]

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


class CPUFallback(dlight.ScheduleRule):
    """Inline everything inlinable, then per remaining block: fuse the spatial loops,
    vectorise an innermost chunk (when the block is injective) and parallelise the rest
    when the block is large enough to pay for the thread launch."""

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
            fused = sch.fuse(*s_loops)
            total = _extent(sch, fused)
            work = total * math.prod(_extent(sch, l) for l in r_loops)
            if not r_loops:
                vec = math.gcd(total, lanes)
                if vec > 1:
                    fused, inner = sch.split(fused, [None, vec])
                    sch.vectorize(inner)
            if work >= PARALLEL_MIN_ELEMENTS and _extent(sch, fused) > 1:
                sch.parallel(fused)
            if r_loops:
                sch.decompose_reduction(block, r_loops[0])
        return sch


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


def _schedule_passes(target):
    return [
        dlight.ApplyDefaultSchedule(dlight.cpu.Reduction(), dlight.cpu.GEMV(), CPUFallback()),
    ]


def relax_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The whole Relax-to-VM pipeline of this target, as one module pass."""

    @tvm.transform.module_pass(opt_level=0, name="QCompileLLVMPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                [FastMath]
                + cpu_generic.library_dispatch_passes(target)
                + cpu_generic.legalize_passes(target)
                + [relax.transform.DeadCodeElimination()]
                + _schedule_passes(target)
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


def export_library(executable, path) -> str:
    """Write the executable as a shared library (``model.so``) at ``path``."""
    path = os.fspath(path)
    executable.export_library(path)
    return path
