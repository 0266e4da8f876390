"""Which kernel a batch-1 QLinear gets (LUT or dequant GEMV), and the LUT lowering.

The T-MAC style LUT GEMV of :mod:`qcompile.backends.lut_kernels` replaces the fused dequant
GEMV of :mod:`qcompile.backends.gemv_kernels` for a QLinear whose activation has one row
(m = 1: batch-1 decode), on targets with a byte shuffle (x86 ``pshufb``, aarch64 ``tbl``).

Invariants:

1. :func:`choose_gemv_kernels` decides once per m = 1 QLinear, before lowering, with
   ``mode``: "dequant" never picks LUT; "lut" picks it wherever :func:`lut_supported` allows
   and the weights are constants; "auto" additionally asks :func:`choose_m1_kernel`. The
   decision (``kernel`` "lut"/"dequant", ``reason`` when not LUT) goes to
   ``graph.metadata["gemv_kernels"][node]`` and to the node's ``quant_recipe`` entry
   (``gemv_kernel``, ``gemv_reason``), so the artifact's manifest and report record it.
   QLinears with m > 1 get no decision (the GEMM / small-m GEMV of kernels.qlinear_kernel).
2. :func:`lower_lut_qlinear` is called by ``relax_lowering._qlinear`` for exactly the nodes
   marked "lut" (:func:`is_lut`); the LUT weight layout (bit planes, per-vector scales) is
   packed at compile time from the node's constant qweight / scales / zeros, so the library
   carries the same number of code bytes as the dequant kernel's packed weights.
3. Numerics: the LUT kernel differs from the exact dequant GEMV by its int8 table rounding,
   at most :func:`qcompile.backends.lut_kernels.table_error_bound` per output.
"""

from __future__ import annotations

import logging
import math

from tvm import relax

from qcompile.errors import InputError
from qcompile.ir import Graph, Node
from qcompile.schedules.lut import lut_isa

from . import lut_kernels
from .lut_kernels import choose_m1_kernel, lut_supported

__all__ = ["GEMV_KERNELS", "METADATA_KEY", "choose_gemv_kernels", "is_lut", "lower_lut_qlinear"]

logger = logging.getLogger(__name__)

GEMV_KERNELS = ("auto", "lut", "dequant")
METADATA_KEY = "gemv_kernels"


def choose_gemv_kernels(graph: Graph, target, mode: str = "auto") -> tuple[Graph, list[dict]]:
    """Mark every m = 1 QLinear of a copy of ``graph`` "lut" or "dequant" (invariant 1).

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


def is_lut(graph: Graph, node: Node) -> bool:
    """Whether :func:`choose_gemv_kernels` marked ``node`` for the LUT GEMV."""
    return graph.metadata.get(METADATA_KEY, {}).get(node.name, {}).get("kernel") == "lut"


def lower_lut_qlinear(ctx, node: Node, x):
    """The LUT GEMV call for QLinear ``node`` on x[1, k] (relax_lowering's ``_Ctx``); y[1, n]."""
    spec = ctx.graph.values[node.inputs[1]].quant
    k, n = spec.logical_shape
    bits, gs, sym = _params(node)
    ins = list(node.inputs) + [""] * (5 - len(node.inputs))
    const = ctx.graph.constants
    lut = lut_kernels.pack_lut_weights(const[ins[1]], const[ins[2]], None if sym else const[ins[3]],
                                       bits, gs, k, lut_isa(ctx.target).rows)
    args = [x] + [relax.const(a) for a in lut_kernels.lut_arrays(lut)]
    if ins[4]:
        args.append(ctx.get(ins[4]))
    return ctx.call_kernel("lut_gemv_kernel", (k, n, bits, gs, sym, bool(ins[4])), args, (1, n),
                           builders=lut_kernels)


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
    weights = [name for name in node.inputs[1:4] if name]
    reason = lut_supported(k, n, bits, gs, target)
    if reason is None and not all(g.is_constant(name) for name in weights):
        reason = "the weights are not constants (the LUT layout is packed at compile time)"
    if reason is None and mode == "auto" and choose_m1_kernel(k, n, bits, gs, target) != "lut":
        reason = "estimated slower than the dequant GEMV (lut_kernels.choose_m1_kernel)"
    if reason is not None:
        if mode == "lut":
            logger.warning("layer '%s': no LUT GEMV (%s); using the dequant GEMV", node.name, reason)
        return {**decision, "kernel": "dequant", "reason": reason}
    return {**decision, "kernel": "lut"}
