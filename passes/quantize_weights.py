"""QuantizeWeightsPass: weight-only RTN quantization of Linear weights and embedding tables.

Rewrites (functional: works on ``graph.copy()``; node names and output values are kept):

1. ``Linear(x, W[K, N], b?)`` -> ``QLinear(x, qweight, scales, zeros | "", b | "")`` with
   attrs ``bits, group_size, symmetric``. ``qweight`` is uint8[N, ceil(K*bits/8)] carrying
   ``QuantSpec(bits, symmetric, axis=0, group_size, logical_shape=(K, N), method="rtn")``;
   scales/zeros are float32[N, G] (see :mod:`passes.rtn`).
2. ``Gather(T[V, D], idx)`` on axis 0 with T a float32 constant of at least
   ``config.min_embedding_size`` elements -> ``QGather(qtable, scales, zeros | "", idx)``:
   rows quantized along D with ``embedding_bits`` (QuantSpec axis=1, logical_shape=(V, D));
   qtable is uint8[V, ceil(D*bits/8)], scales/zeros float32[V, G].

Refusals (left float): nodes named in ``config.exclude``; Linears with K*N below
``config.min_linear_size``; weights/tables that are not float32 2-D constants; Gathers on
another axis, small tables, or ``embedding_bits=None``.

Errors: K (or D) not a multiple of the group size raises InputError naming the node.

Postcondition: every QLinear/QGather packed input carries a QuantSpec; float weights no
longer used are removed. ``graph.metadata["quant_recipe"]`` lists, in node order, one dict
per rewritten node: node, op, shape, bits, group_size, symmetric, method, clip_search,
weight_bytes_fp32, weight_bytes_packed (codes + scales + zeros), rel_error (||W-Wq||/||W||).
A weight shared by several nodes is quantized once and listed for each node.

Hooks (used by GPTQ and mixed precision; defaults reproduce plain RTN):
``layer_bits`` maps Linear node names to their own bit width (else ``config.bits``);
``quantizer`` is a :class:`LinearQuantizer` that quantizes a Linear's weight
(``quantize(node, W, bits, group_size, symmetric, clip_search) -> PackedWeight | None``;
None falls back to RTN for that node); its ``method`` is written to the QuantSpec and recipe.
Embedding tables always use RTN.
"""

from __future__ import annotations

import logging
from typing import Mapping, Protocol

from qcompile.errors import InvariantError
from qcompile.ir import Graph, Node, QuantSpec

from .base import Pass, PassResult
from .quant_config import WeightQuantConfig
from .rtn import PackedWeight, quantize_and_pack, relative_error

__all__ = ["QuantizeWeightsPass", "LinearQuantizer"]

logger = logging.getLogger(__name__)


class LinearQuantizer(Protocol):
    """Quantizes one Linear weight W[K, N]; returns None to leave it to RTN."""

    method: str

    def quantize(self, node: str, w, bits: int, group_size: int, symmetric: bool,
                 clip_search: bool) -> PackedWeight | None: ...


class QuantizeWeightsPass(Pass):
    """Linear -> QLinear and embedding Gather -> QGather, by :class:`WeightQuantConfig`."""

    name = "QuantizeWeightsPass"

    def __init__(self, config: WeightQuantConfig | None = None, *, layer_bits: Mapping[str, int] | None = None,
                 quantizer: LinearQuantizer | None = None):
        self.config = config or WeightQuantConfig()
        self.layer_bits = dict(layer_bits or {})
        self.quantizer = quantizer

    def call(self, graph: Graph) -> PassResult:
        g = graph.copy()
        cache: dict[tuple, tuple[dict[str, str], PackedWeight, float]] = {}
        recipe: list[dict] = []
        replaced: set[str] = set()
        for index, node in enumerate(g.nodes):
            rewrite = self._rewrite_linear if node.op == "Linear" else self._rewrite_gather
            if node.op in ("Linear", "Gather") and node.name not in self.config.exclude:
                entry = rewrite(g, index, cache)
                if entry is not None:
                    recipe.append(entry)
                    replaced.add(node.inputs[1] if node.op == "Linear" else node.inputs[0])
        if not recipe:
            return PassResult(graph, False)
        _drop_unused(g, replaced)
        g.metadata["quant_recipe"] = recipe
        g.metadata["weight_quant_config"] = self.config.to_json()
        logger.info("QuantizeWeightsPass: %d node(s) quantized", len(recipe))
        return PassResult(g, True)

    def ensures(self, graph: Graph) -> None:
        for node in graph.nodes:
            if node.op in ("QLinear", "QGather") and graph.values[node.inputs[0 if node.op == "QGather" else 1]].quant is None:
                raise InvariantError(f"node '{node.name}' ({node.op}): packed weight has no QuantSpec")

    # -- rewrites ----------------------------------------------------------------------
    def _rewrite_linear(self, g: Graph, index: int, cache) -> dict | None:
        node = g.nodes[index]
        w = node.inputs[1]
        wt = g.type_of(w)
        if not g.is_constant(w) or len(wt.shape) != 2 or wt.dtype != "float32":
            return None
        if wt.size < self.config.min_linear_size:
            return None
        cfg = self.config
        bits = self.layer_bits.get(node.name, cfg.bits)
        names, pw, err, method = _quantized(g, cache, w, node.name, g.constants[w], bits, cfg.group_size,
                                            cfg.symmetric, cfg.clip_search, axis=0, quantizer=self.quantizer)
        bias = node.inputs[2] if len(node.inputs) > 2 else ""
        inputs = [node.inputs[0], names["q"], names["scales"], names["zeros"], bias]
        attrs = {"bits": bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric}
        g.nodes[index] = Node("QLinear", node.name, inputs, list(node.outputs), attrs)
        return _entry(node.name, "QLinear", wt.shape, pw, cfg.symmetric, cfg.clip_search, wt.nbytes, err, method)

    def _rewrite_gather(self, g: Graph, index: int, cache) -> dict | None:
        node = g.nodes[index]
        cfg = self.config
        if cfg.embedding_bits is None or len(node.inputs) != 2:
            return None
        table, indices = node.inputs
        tt = g.type_of(table)
        if not g.is_constant(table) or len(tt.shape) != 2 or tt.dtype != "float32":
            return None
        if node.attrs.get("axis", 0) not in (0, -2) or tt.size < cfg.min_embedding_size:
            return None
        bits, gs, sym = cfg.embedding_bits, cfg.embedding_group_size, cfg.embedding_symmetric
        # rows are output channels: quantize T^T [D, V] so that groups run along D
        names, pw, err, _ = _quantized(g, cache, table, node.name, g.constants[table].T, bits, gs, sym,
                                       cfg.clip_search, axis=1)
        inputs = [names["q"], names["scales"], names["zeros"], indices]
        attrs = {"bits": bits, "group_size": gs, "symmetric": sym}
        g.nodes[index] = Node("QGather", node.name, inputs, list(node.outputs), attrs)
        return _entry(node.name, "QGather", tt.shape, pw, sym, cfg.clip_search, tt.nbytes, err)


def _quantized(g: Graph, cache: dict, weight: str, node_name: str, matrix, bits: int, group_size: int,
               symmetric: bool, clip_search: bool, axis: int, quantizer: LinearQuantizer | None = None):
    """Quantize ``matrix`` ([K, N], groups along K) once per setting; add its constants to g."""
    key = (weight, axis, bits, group_size, symmetric, clip_search)
    if key not in cache:
        pw = None
        if quantizer is not None:
            pw = quantizer.quantize(node_name, matrix, bits, group_size, symmetric, clip_search)
        method = "rtn" if pw is None else quantizer.method
        if pw is None:
            pw = quantize_and_pack(matrix, bits, group_size, symmetric, clip_search, name=node_name)
        k, n = pw.logical_shape
        logical = (k, n) if axis == 0 else (n, k)
        spec = QuantSpec(bits=bits, symmetric=symmetric, axis=axis, group_size=group_size,
                         logical_shape=logical, method=method)
        names = {
            "q": g.add_constant(g.fresh_name(f"{weight}.qweight"), pw.packed, spec),
            "scales": g.add_constant(g.fresh_name(f"{weight}.scales"), pw.scales),
            "zeros": "" if pw.zeros is None else g.add_constant(g.fresh_name(f"{weight}.zeros"), pw.zeros),
        }
        cache[key] = (names, pw, relative_error(matrix, pw.dequantize()), method)
    return cache[key]


def _entry(node: str, op: str, shape, pw: PackedWeight, symmetric: bool, clip_search: bool,
           fp32_bytes: int, rel_error: float, method: str = "rtn") -> dict:
    return {
        "node": node,
        "op": op,
        "shape": [int(d) for d in shape],
        "bits": pw.bits,
        "group_size": pw.group_size,
        "symmetric": symmetric,
        "method": method,
        "clip_search": clip_search,
        "weight_bytes_fp32": int(fp32_bytes),
        "weight_bytes_packed": pw.nbytes,
        "rel_error": round(float(rel_error), 6),
    }


def _drop_unused(g: Graph, names: set[str]) -> None:
    used = {name for node in g.nodes for name in node.inputs} | set(g.outputs)
    for name in names - used:
        g.constants.pop(name, None)
        g.values.pop(name, None)
