"""Which kernel a batch-1 QLinear gets (VNNI, LUT or dequant GEMV), and their lowering.

For a QLinear whose activation has one row (m = 1: batch-1 decode) two GEMVs with a
compile-time weight layout replace the fused dequant GEMV of
:mod:`qcompile.backends.gemv_kernels`: the row-interleaved int8-activation VNNI GEMV of
:mod:`qcompile.backends.gemv_vnni` (x86 AVX-512 VNNI, 2/4 bits) and the T-MAC style LUT GEMV
of :mod:`qcompile.backends.lut_kernels` (targets with a byte shuffle: x86 ``pshufb``,
aarch64 ``tbl``).

Invariants:

1. :func:`choose_gemv_kernels` decides once per m = 1 QLinear, before lowering, with
   ``mode``: "dequant" never picks a repacked kernel; "lut" / "vnni" pick that kernel wherever
   it fits and the weights are constants; "auto" picks VNNI where it fits (measured faster
   than LUT at 2 and 4 bits on every decode shape of tools/bench_lut.py, and than the dequant
   GEMV), else LUT where :func:`choose_m1_kernel` prefers it. The decision (``kernel``
   "vnni"/"lut"/"dequant", ``reason`` why the kernels preferred by the mode were not taken)
   goes to ``graph.metadata["gemv_kernels"][node]`` and to the node's ``quant_recipe`` entry
   (``gemv_kernel``, ``gemv_reason``), so the artifact's manifest and report record it.
   QLinears with m > 1 get no decision (the GEMM / small-m GEMV of kernels.qlinear_kernel).
2. :func:`lower_m1_qlinear` is called by ``relax_lowering._qlinear`` for exactly the nodes
   marked "vnni" or "lut" (:func:`m1_kernel`); their weight layouts (row-interleaved code
   dwords or bit planes, per-vector scales) are packed at compile time from the node's
   constant qweight / scales / zeros, so the library carries the same number of code bytes
   as the dequant kernel's packed weights.
3. Numerics: both differ from the exact dequant GEMV by an int8 rounding of the activations
   (VNNI: per block, like onnxruntime MatMulNBits accuracy_level 4; LUT: of its tables, at
   most :func:`qcompile.backends.lut_kernels.table_error_bound` per output).
"""

from __future__ import annotations

import logging
import math

from tvm import relax

from qcompile.errors import InputError
from qcompile.ir import Graph, Node
from qcompile.schedules.lut import lut_isa

from . import gemv_vnni, lut_kernels
from .gemv_vnni import vnni_supported
from .lut_kernels import choose_m1_kernel, lut_supported

__all__ = ["GEMV_KERNELS", "METADATA_KEY", "choose_gemv_kernels", "m1_kernel", "lower_m1_qlinear"]

logger = logging.getLogger(__name__)

GEMV_KERNELS = ("auto", "vnni", "lut", "dequant")
METADATA_KEY = "gemv_kernels"


def choose_gemv_kernels(graph: Graph, target, mode: str = "auto") -> tuple[Graph, list[dict]]:
    """Mark every m = 1 QLinear of a copy of ``graph`` "vnni", "lut" or "dequant" (invariant 1).

    Returns (graph copy, decisions in node order)."""
    if mode not in GEMV_KERNELS:
        raise InputError(f"--gemv-kernel must be one of {', '.join(GEMV_KERNELS)} (got '{mode}')")
    g = graph.copy()
    recipe = {entry.get("node"): entry for entry in g.metadata.get("quant_recipe", [])}
    decisions = []
    for node in g.nodes:
        if node.op != "QLinear" or _rows(g, node) != 1:
            continue
        decision = _decide(g, node, target, mode)
        decisions.append(decision)
        entry = recipe.get(node.name)
        if entry is not None:
            entry["gemv_kernel"] = decision["kernel"]
            if "reason" in decision:
                entry["gemv_reason"] = decision["reason"]
    if decisions:
        g.metadata[METADATA_KEY] = {d["node"]: d for d in decisions}
    return g, decisions


def m1_kernel(graph: Graph, node: Node) -> str | None:
    """The kernel :func:`choose_gemv_kernels` marked ``node`` for ("vnni", "lut", "dequant"), or None."""
    return graph.metadata.get(METADATA_KEY, {}).get(node.name, {}).get("kernel")


def repack_m1_weights(kind: str, qweight, scales, zeros, bits: int, group: int, k: int, target):
    """QLinear weights (``qcompile.quant`` layout) repacked for the m = 1 kernel ``kind``
    ("vnni" or "lut") -> (kernel weight arrays, builder module, builder function name); the
    builder takes ``(k, n, bits, group, symmetric, has_bias, target)``."""
    if kind == "vnni":
        return gemv_vnni.vnni_arrays(gemv_vnni.pack_vnni_weights(qweight, scales, zeros, bits, k)), gemv_vnni, "vnni_gemv_kernel"
    lut = lut_kernels.pack_lut_weights(qweight, scales, zeros, bits, group, k, lut_isa(target).rows)
    return lut_kernels.lut_arrays(lut), lut_kernels, "lut_gemv_kernel"


def lower_m1_qlinear(ctx, node: Node, x):
    """The VNNI or LUT GEMV call (per :func:`m1_kernel`) for QLinear ``node`` on x[1, k]
    (relax_lowering's ``_Ctx``); y[1, n]."""
    spec = ctx.graph.values[node.inputs[1]].quant
    k, n = spec.logical_shape
    bits, gs, sym = _params(node)
    ins = list(node.inputs) + [""] * (5 - len(node.inputs))
    const = ctx.graph.constants
    qweight, scales, zeros = const[ins[1]], const[ins[2]], None if sym else const[ins[3]]
    arrays, builders, builder = repack_m1_weights(m1_kernel(ctx.graph, node), qweight, scales, zeros, bits, gs, k,
                                                  ctx.target)
    args = [x] + [relax.const(a) for a in arrays]
    if ins[4]:
        args.append(ctx.get(ins[4]))
    return ctx.call_kernel(builder, (k, n, bits, gs, sym, bool(ins[4])), args, (1, n), builders=builders)


def _params(node: Node) -> tuple[int, int, bool]:
    return int(node.attrs["bits"]), int(node.attrs.get("group_size", 0)), bool(node.attrs["symmetric"])


def _rows(g: Graph, node: Node) -> int:
    return math.prod(g.type_of(node.inputs[0]).shape[:-1])


def _decide(g: Graph, node: Node, target, mode: str) -> dict:
    spec = g.values[node.inputs[1]].quant
    k, n = spec.logical_shape
    bits, gs, _ = _params(node)
    decision = {"node": node.name, "m": 1, "k": int(k), "n": int(n), "bits": bits, "group_size": gs}
    if mode == "dequant":
        return {**decision, "kernel": "dequant", "reason": "--gemv-kernel dequant"}
    if not all(g.is_constant(name) for name in node.inputs[1:4] if name):
        reason = "the weights are not constants (the VNNI / LUT layouts are packed at compile time)"
        return _fallback(node, mode, {**decision, "kernel": "dequant", "reason": reason})
    reasons = []
    for kernel in ("vnni", "lut") if mode == "auto" else (mode,):
        reason = _unfit(kernel, k, n, bits, gs, target, mode)
        if reason is None:
            return {**decision, "kernel": kernel, **({"reason": "; ".join(reasons)} if reasons else {})}
        reasons.append(f"{kernel}: {reason}")
    return _fallback(node, mode, {**decision, "kernel": "dequant", "reason": "; ".join(reasons)})


def _unfit(kernel: str, k: int, n: int, bits: int, gs: int, target, mode: str) -> str | None:
    """Why ``kernel`` is not used for this shape (None: it is)."""
    if kernel == "vnni":
        return vnni_supported(k, n, bits, gs, target)
    reason = lut_supported(k, n, bits, gs, target)
    if reason is None and mode == "auto" and choose_m1_kernel(k, n, bits, gs, target) != "lut":
        reason = "estimated slower than the dequant GEMV (lut_kernels.choose_m1_kernel)"
    return reason


def _fallback(node: Node, mode: str, decision: dict) -> dict:
    if mode != "auto":
        logger.warning("layer '%s': no %s GEMV (%s); using the dequant GEMV", node.name, mode.upper(),
                       decision["reason"])
    return decision
