"""Mixed-precision weight quantization: per-layer bit widths from an integer program (HAWQ-V3 style).

Each quantizable Linear ``l`` (those :class:`passes.quantize_weights.QuantizeWeightsPass`
would rewrite) may take a bit width ``b`` in ``choices`` (default {2, 3, 4, 8}); a Linear in
``fixed_bits`` (e.g. the outlier pieces of ``--outlier-bits``) has that one width, counted in
the budget.

Sensitivity ``s[l, b]``: the relative output error of layer l on the calibration data,
``tr(dW^T H dW) / tr(W^T H W)`` with ``H`` the calibration Hessian (:mod:`passes.calibrate`)
and ``dW`` the error of the method actually used (RTN, or GPTQ when ``method="gptq"``), so
the quantized weights computed for the sensitivity are the ones finally used; with
``method="gptaq"`` the widths come from GPTQ's errors and the weights are then quantized by
:mod:`passes.gptaq` in graph order (which needs ``feeds``). Without a
Hessian for a layer, ``H = I`` (relative weight error). With calibration ``feeds`` the
sensitivity is measured in model-output units instead (HAWQ-V3's "how much does the model
output move", measured rather than estimated): ``s[l, lowest]`` is the squared error of the
graph outputs on the first feed with only layer l at its lowest width (the rest of the graph
re-run from l's cached inputs), and ``s[l, b] = s[l, lowest] * e[l, b] / e[l, lowest]`` with
``e`` the Hessian error above, so layers whose errors the network amplifies (or damps) are
weighted accordingly.

Cost ``c[l, b]``: with ``avg_bits``, code bits ``K*N*b`` against the budget
``avg_bits * sum K*N`` (scales and zeros not counted, as "W4 g128" names 4 bits); with
``size_budget_bytes``, the packed bytes (codes + scales + zeros) of each Linear plus the
fixed bytes of everything else in the quantized graph (embeddings, biases, norms) against
the budget.

Program (:func:`choose_bits`, ``scipy.optimize.milp``): binary ``x[l, b]``, one width per
layer, ``sum c x <= budget``, minimize ``sum s x``. An infeasible budget raises InputError
stating the smallest possible size. The result is optimal for the model (tested against
brute force).

Postcondition: as QuantizeWeightsPass, with per-layer ``bits`` in the recipe, and
``graph.metadata["mixed_precision"]`` holding the budget, the achieved cost, the average
code bits and each layer's chosen width and sensitivities.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from qcompile.errors import InputError
from qcompile.ir import Graph

from .base import Pass, PassResult
from .calibrate import Stats
from .gptq import GPTQQuantizer, hessian_error
from .quant_config import WeightQuantConfig
from .quantize_weights import QuantizeWeightsPass
from .rtn import PackedWeight, quantize_and_pack

__all__ = ["DEFAULT_CHOICES", "choose_bits", "MixedPrecisionPass"]

logger = logging.getLogger(__name__)

DEFAULT_CHOICES = (2, 3, 4, 8)


def choose_bits(sensitivity: Mapping[str, Mapping[int, float]], cost: Mapping[str, Mapping[int, float]],
                budget: float) -> dict[str, int]:
    """Per layer, the width minimizing total sensitivity with total cost <= budget (milp)."""
    layers = list(sensitivity)
    pairs = [(layer, b) for layer in layers for b in sorted(sensitivity[layer])]
    if not pairs:
        return {}
    c = np.array([sensitivity[layer][b] for layer, b in pairs], dtype=np.float64)
    weights = np.array([cost[layer][b] for layer, b in pairs], dtype=np.float64)
    onehot = np.array([[1.0 if layer == name else 0.0 for layer, _ in pairs] for name in layers])
    minimum = sum(min(cost[layer].values()) for layer in layers)
    if minimum > budget * (1 + 1e-12):
        raise InputError(f"budget {budget:.6g} is below the smallest possible {minimum:.6g}")
    scale = max(float(np.max(np.abs(c))), 1e-30)
    res = milp(c / scale, integrality=np.ones(len(pairs)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(onehot, 1, 1), LinearConstraint(weights[None, :], -np.inf, budget)])
    if res.x is None:
        raise InputError(f"no bit assignment fits the budget {budget:.6g} ({res.message})")
    chosen = {}
    for (layer, b), x in zip(pairs, res.x):
        if x > 0.5:
            chosen[layer] = b
    return chosen


class MixedPrecisionPass(Pass):
    """Chooses per-Linear widths by :func:`choose_bits`, then quantizes (RTN or GPTQ)."""

    name = "MixedPrecisionPass"

    def __init__(self, config: WeightQuantConfig, stats: Stats | None, *, avg_bits: float | None = None,
                 size_budget_bytes: int | None = None, method: str = "rtn", act_order: bool = False,
                 choices: Sequence[int] = DEFAULT_CHOICES, fixed_bits: Mapping[str, int] | None = None,
                 feeds: Sequence[dict] | None = None, percdamp: float | None = None):
        if (avg_bits is None) == (size_budget_bytes is None):
            raise InputError("mixed precision needs exactly one of --bits (average) or --size-budget")
        if method not in ("rtn", "gptq", "gptaq"):
            raise InputError(f"--method must be rtn, gptq or gptaq (got '{method}')")
        if method != "rtn" and stats is None:
            raise InputError(f"--method {method} needs calibration statistics")
        self.config, self.stats = config, stats
        self.avg_bits, self.size_budget_bytes = avg_bits, size_budget_bytes
        self.method, self.act_order = method, act_order
        self.choices = tuple(sorted(choices))
        self.fixed_bits = dict(fixed_bits or {})
        self.feeds, self.percdamp = list(feeds or ()), percdamp

    def call(self, graph: Graph) -> PassResult:
        layers = _candidates(graph, self.config)
        if not layers:
            return PassResult(graph, False)
        table = self._quantize_all(graph, layers)
        sens = {name: {b: self._sensitivity(graph, name, w, pw) for b, pw in table[name].items()}
                for name, w in layers.items()}
        if self.feeds:
            sens = _output_scaled(graph, self.feeds[0], table, sens)
        quantizer = _Cached(self.method, table)
        if self.avg_bits is not None:
            cost = {n: {b: float(graph.type_of(w).size * b) for b in table[n]} for n, w in layers.items()}
            budget = self.avg_bits * sum(graph.type_of(w).size for w in layers.values())
        else:
            cost = {n: {b: float(pw.nbytes) for b, pw in table[n].items()} for n in layers}
            smallest = {n: min(table[n]) for n in layers}
            low = QuantizeWeightsPass(self.config, layer_bits=smallest, quantizer=quantizer)(graph).graph
            fixed = low.weight_bytes() - sum(cost[n][smallest[n]] for n in layers)
            budget = float(self.size_budget_bytes) - fixed
        chosen = choose_bits(sens, cost, budget)
        if self.method == "gptaq":  # widths chosen on GPTQ's errors; the weights by GPTAQ in graph order
            from .gptaq import ErrorFeedbackQuantizer

            quantizer = ErrorFeedbackQuantizer(graph, self.feeds, act_order=self.act_order, percdamp=self.percdamp)
        result = QuantizeWeightsPass(self.config, layer_bits=chosen, quantizer=quantizer)(graph)
        g = result.graph
        g.metadata["mixed_precision"] = self._summary(graph, layers, chosen, sens, cost, budget)
        logger.info("mixed precision: %s", g.metadata["mixed_precision"]["average_bits"])
        return PassResult(g, True)

    # -- pieces ------------------------------------------------------------------------
    def _quantize_all(self, graph: Graph, layers: dict[str, str]) -> dict[str, dict[int, PackedWeight]]:
        cfg = self.config
        gptq = None
        if self.method in ("gptq", "gptaq"):
            gptq = GPTQQuantizer(self.stats, act_order=self.act_order, percdamp=self.percdamp)
        table: dict[str, dict[int, PackedWeight]] = {}
        for name, weight in layers.items():
            w = graph.constants[weight]
            table[name] = {}
            for b in (self.fixed_bits[name],) if name in self.fixed_bits else self.choices:
                pw = gptq.quantize(name, w, b, cfg.group_size, cfg.symmetric, cfg.clip_search) if gptq else None
                if pw is None:
                    pw = quantize_and_pack(w, b, cfg.group_size, cfg.symmetric, cfg.clip_search, name=name)
                table[name][b] = pw
        return table

    def _sensitivity(self, graph: Graph, name: str, weight: str, pw: PackedWeight) -> float:
        w = graph.constants[weight]
        record = self.stats.for_linear(name) if self.stats is not None else None
        h = record.mean_hessian() if record is not None and record.rows else np.eye(w.shape[0])
        base = hessian_error(w, np.zeros_like(w), h)
        return hessian_error(w, pw.dequantize(), h) / base if base > 0 else 0.0

    def _summary(self, graph, layers, chosen, sens, cost, budget) -> dict:
        elems = {n: graph.type_of(w).size for n, w in layers.items()}
        avg = sum(elems[n] * chosen[n] for n in layers) / sum(elems.values())
        return {
            "objective": "sum of measured model-output errors" if self.feeds else
                         "sum of relative Hessian-weighted output errors",
            "budget": "average_bits" if self.avg_bits is not None else "size_bytes",
            "budget_value": self.avg_bits if self.avg_bits is not None else self.size_budget_bytes,
            "linear_budget": round(budget, 3),
            "linear_cost": round(sum(cost[n][chosen[n]] for n in layers), 3),
            "average_bits": round(avg, 4),
            "method": self.method,
            "layers": {n: {"bits": chosen[n], "sensitivity": {str(b): round(s, 8) for b, s in sens[n].items()}}
                       for n in layers},
        }


class _Cached:
    """LinearQuantizer returning the weights already computed for the sensitivity table."""

    def __init__(self, method: str, table: dict[str, dict[int, PackedWeight]]):
        self.method, self.table = method, table

    def quantize(self, node, w, bits, group_size, symmetric, clip_search):
        return self.table.get(node, {}).get(bits)


def _output_scaled(graph: Graph, feed: dict, table, sens) -> dict[str, dict[int, float]]:
    """Sensitivities in units of model-output error, measured: per layer, the squared error of
    the graph outputs with only that layer at its lowest width (one forward of the rest of the
    graph from that layer's cached inputs), times ``sens[b] / sens[lowest]`` for the other widths."""
    from qcompile.interpreter import run, run_node

    env = run(graph, feed, keep_all=True)
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    out = {}
    for name, widths in sens.items():
        low = min(widths)
        local = dict(env)
        for i, n in enumerate(graph.nodes[index[name]:]):
            args = [local[x] if x else None for x in n.inputs]
            if i == 0:
                args[1] = table[name][low].dequantize()
            for value, array in zip(n.outputs, run_node(graph, n, args)):
                local[value] = array
        err = sum(float(np.sum((local[o].astype(np.float64) - env[o]) ** 2)) for o in graph.outputs)
        out[name] = {b: err * (s / widths[low] if widths[low] > 0 else 0.0) for b, s in widths.items()}
    return out


def _candidates(graph: Graph, config: WeightQuantConfig) -> dict[str, str]:
    """Linear node name -> weight constant, for the Linears QuantizeWeightsPass rewrites."""
    out = {}
    for node in graph.nodes:
        if node.op != "Linear" or node.name in config.exclude:
            continue
        w = node.inputs[1]
        t = graph.type_of(w)
        if graph.is_constant(w) and len(t.shape) == 2 and t.dtype == "float32" and t.size >= config.min_linear_size:
            out[node.name] = w
    return out

