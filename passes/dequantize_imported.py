"""DequantizeImportedPass: undo imported (pre-quantized) weights so qcompile can re-quantize.

Used by ``--requantize``. Rewrites (functional: works on ``graph.copy()``):

1. ``QLinear`` whose packed weight has ``QuantSpec.method == "imported"`` -> ``Linear`` with
   the exactly dequantized float32 weight [K, N] (same node name, same output value).
2. ``DequantizeLinear(QuantizeLinear(x, ...))`` on run-time values: the DequantizeLinear output
   is replaced by ``x`` (the fake-quant pair is removed); QuantizeLinear nodes left without
   users disappear.

Refusals: integer ops (DynamicQuantizeLinear, MatMulInteger) are left as they are; so are QDQ
groups the frontend fused into QOperator kernels, which is why the driver imports with
``load_onnx(..., fuse_qdq=False)`` under ``--requantize``.
Postcondition: ``graph.metadata["quant_recipe"]`` keeps only entries of nodes still present
that are not rewritten by case 1 or 2; ``metadata["requantized_from"]`` keeps the old recipe.
"""

from __future__ import annotations

import logging

from qcompile.interpreter import dequantize_qlinear_weight
from qcompile.ir import Graph, Node

from .base import Pass, PassResult

__all__ = ["DequantizeImportedPass", "has_imported_quantization"]

logger = logging.getLogger(__name__)


def has_imported_quantization(graph: Graph) -> bool:
    """True when the frontend imported a quantization recipe (any ``method == "imported"`` entry)."""
    return any(e.get("method") == "imported" for e in graph.metadata.get("quant_recipe", []))


class DequantizeImportedPass(Pass):
    """Imported QLinear -> Linear; activation QuantizeLinear->DequantizeLinear pairs -> identity."""

    name = "DequantizeImportedPass"

    def call(self, graph: Graph) -> PassResult:
        g = graph.copy()
        changed = 0
        producers = g.producers()
        rename: dict[str, str] = {}
        kept: list[Node] = []
        for node in g.nodes:
            node.inputs = [rename.get(i, i) for i in node.inputs]
            spec = g.values[node.inputs[1]].quant if node.op == "QLinear" else None
            if spec is not None and spec.method == "imported":
                args = [g.constants.get(i) if i else None for i in node.inputs]
                weight = g.add_constant(g.fresh_name(f"{node.name}.weight"), dequantize_qlinear_weight(g, node, args))
                bias = node.inputs[4] if len(node.inputs) > 4 else ""
                kept.append(Node("Linear", node.name, [node.inputs[0], weight] + ([bias] if bias else []), node.outputs))
                changed += 1
                continue
            src = producers.get(node.inputs[0]) if node.op == "DequantizeLinear" else None
            if src is not None and src.op == "QuantizeLinear" and node.outputs[0] not in g.outputs:
                rename[node.outputs[0]] = src.inputs[0]
                changed += 1
                continue
            kept.append(node)
        if not changed:
            return PassResult(graph, False)
        g.nodes = kept
        g.outputs = [rename.get(o, o) for o in g.outputs]
        g.remove_unused()
        names = {n.name for n in g.nodes if n.op not in ("Linear",)}
        old = g.metadata.get("quant_recipe", [])
        g.metadata["requantized_from"] = old
        g.metadata["quant_recipe"] = [e for e in old if e.get("node") in names and e.get("op") not in ("QLinear", "QuantizeLinear", "DequantizeLinear")]
        logger.info("DequantizeImportedPass: %d imported node(s) dequantized", changed)
        return PassResult(g, True)
