"""Profitability check: is a quantized Linear estimated slower than its float counterpart?

A cheap, deterministic cost model from the kernel that would be built (no measurement):

* float Linear: the streaming fp32 GEMV (``gemv_kernels.use_fp32_gemv``) costs its weight
  bytes over memory bandwidth; otherwise the register-tiled GEMM costs its FLOPs at the
  vector rate, or at the scalar rate (1/lanes) when n does not fill vectors (the schedule's
  scalar-tile fallback), and never less than its weight bytes over bandwidth.
* QLinear: a GEMV variant (``gemv_kernels.gemv_variant``) costs max(packed bytes over
  bandwidth, codes over the variant's unpack rate); otherwise the fused GEMM costs its FLOPs
  like the float GEMM plus the in-kernel dequantization of all k*n weights (vector rate, or
  1/8 of it on scalar tiles and for 3-bit codes that straddle bytes).

Rates (:data:`RATES`) were measured on the 2-core AVX-512 x86 host (fp32 GEMM ~220 GFLOP/s,
fused 4-bit GEMM the same, GEMV float variant ~40 G codes/s).
Only the ratio of the two estimates matters; a layer is unprofitable when the quantized
estimate exceeds the float one by more than :data:`MARGIN`.

:func:`apply_fallback` records the decision per QLinear in ``graph.metadata["quant_recipe"]``
(``est_quant_us``, ``est_float_us``; unprofitable layers get ``unprofitable`` with the reason
and, in mode "auto", ``fallback: "float"``) and in "auto" mode puts those layers back to the
float ``Linear`` of ``float_graph`` (same node name, same weight values).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from qcompile.ir import Graph, Node

from . import gemv_kernels

__all__ = ["Estimate", "RATES", "MARGIN", "FALLBACK_MODES", "estimate_linear", "apply_fallback"]

logger = logging.getLogger(__name__)

FALLBACK_MODES = ("off", "auto")
MARGIN = 0.10
RATES = {
    "gemm_flops": 200e9,      # fp32 FLOP/s of the vectorized register tile
    "mem_bytes": 20e9,        # streaming read bandwidth (bytes/s)
    "dequant": 8e9,           # weights/s dequantized into the GEMM panel (vector)
    "gemv_float": 40e9,       # codes/s of the float GEMV variant (per row of x)
}


@dataclass(frozen=True)
class Estimate:
    """Estimated seconds of one call of the quantized and the float kernel, and why."""

    quant_s: float
    float_s: float
    quant_kernel: str
    float_kernel: str

    @property
    def profitable(self) -> bool:
        return self.quant_s <= self.float_s * (1 + MARGIN)

    @property
    def reason(self) -> str:
        return (f"estimated {self.quant_kernel} {self.quant_s * 1e6:.1f} us > "
                f"{self.float_kernel} {self.float_s * 1e6:.1f} us")


def _lanes(target) -> int:
    return gemv_kernels._lanes(target)  # pylint: disable=protected-access


def estimate_linear(m: int, k: int, n: int, bits: int, group_size: int, target) -> Estimate:
    """Cost estimate of QLinear vs Linear for x[m, k] @ W[k, n] on ``target``."""
    lanes = _lanes(target)
    vec = lanes > 1 and n % lanes == 0
    flop_rate = RATES["gemm_flops"] if vec else RATES["gemm_flops"] / max(lanes, 1)
    fp32_bytes = 4.0 * k * n
    if gemv_kernels.use_fp32_gemv(m, k, n, target):
        float_s, float_kernel = fp32_bytes / RATES["mem_bytes"], "fp32 GEMV"
    else:
        float_s = max(2.0 * m * k * n / flop_rate, fp32_bytes / RATES["mem_bytes"])
        float_kernel = "fp32 GEMM" + ("" if vec else " (scalar tile)")
    packed = n * math.ceil(k * bits / 8) + 8.0 * n * (k // group_size if group_size else 1)
    variant = gemv_kernels.gemv_variant(m, k, n, bits, group_size, target)
    if variant is not None:
        quant_s = max(packed / RATES["mem_bytes"], m * k * n / RATES["gemv_float"])
        quant_kernel = f"{bits}-bit {variant} GEMV"
    else:
        dq_rate = RATES["dequant"] if vec and bits != 3 else RATES["dequant"] / 8
        quant_s = max(2.0 * m * k * n / flop_rate, packed / RATES["mem_bytes"]) + k * n / dq_rate
        quant_kernel = f"{bits}-bit fused GEMM" + ("" if vec else " (scalar tile)")
    return Estimate(quant_s, float_s, quant_kernel, float_kernel)


def apply_fallback(graph: Graph, float_graph: Graph, target, mode: str = "auto") -> tuple[Graph, list[dict]]:
    """Estimate every QLinear of ``graph``; in mode "auto" revert the unprofitable ones.

    Returns (graph, decisions); the graph is a copy when anything changed (recipe entries
    are annotated in place on the copy's metadata). ``float_graph`` must hold the float
    Linear of the same node name (what QuantizeWeightsPass rewrote).
    """
    if mode not in FALLBACK_MODES:
        raise ValueError(f"fallback mode must be one of {FALLBACK_MODES} (got {mode!r})")
    g = graph.copy()
    float_nodes = {node.name: node for node in float_graph.nodes if node.op == "Linear"}
    recipe = {entry.get("node"): entry for entry in g.metadata.get("quant_recipe", [])}
    decisions = []
    for index, node in enumerate(g.nodes):
        if node.op != "QLinear":
            continue
        est = _estimate_node(g, node, target)
        decision = {"node": node.name, "est_quant_us": round(est.quant_s * 1e6, 3),
                    "est_float_us": round(est.float_s * 1e6, 3), "profitable": est.profitable}
        entry = recipe.get(node.name)
        if entry is not None:
            entry.update(est_quant_us=decision["est_quant_us"], est_float_us=decision["est_float_us"])
        if not est.profitable:
            decision["reason"] = est.reason
            logger.warning("layer '%s': quantized kernel %s%s", node.name, est.reason,
                           "; keeping it float (--fallback auto)" if mode == "auto" else
                           " (use --fallback auto to keep it float)")
            if entry is not None:
                entry["unprofitable"] = est.reason
            if mode == "auto" and node.name in float_nodes:
                _revert(g, index, float_nodes[node.name], float_graph)
                decision["fallback"] = "float"
                if entry is not None:
                    entry.update(fallback="float", reason=est.reason)
        decisions.append(decision)
    if any(d.get("fallback") for d in decisions):
        g.remove_unused()
    return g, decisions


def _estimate_node(g: Graph, node: Node, target) -> Estimate:
    x_shape = g.type_of(node.inputs[0]).shape
    k, n = g.values[node.inputs[1]].quant.logical_shape
    m = math.prod(x_shape[:-1]) if len(x_shape) > 1 else 1
    return estimate_linear(int(m), int(k), int(n), int(node.attrs["bits"]),
                           int(node.attrs.get("group_size", 0)), target)


def _revert(g: Graph, index: int, float_node: Node, float_graph: Graph) -> None:
    """QLinear at ``index`` -> the float Linear (weight and bias constants copied over)."""
    for name in float_node.inputs[1:]:
        if name and name not in g.values and float_graph.is_constant(name):
            g.add_constant(name, float_graph.constants[name])
    node = g.nodes[index]
    g.nodes[index] = Node("Linear", node.name, list(float_node.inputs), list(node.outputs), dict(float_node.attrs))
