"""GPTAQ: GPTQ in graph order with error feedback from the layers already quantized.

Plain GPTQ (:mod:`passes.gptq`) fits every Linear ``y = x @ W`` to the float model's own
inputs: ``min ||X Wq - X W||``. At 2-3 bits the error of the earlier layers changes what a
later layer sees, and each layer's error adds to the residual stream it writes. GPTAQ
(asymmetric calibration, Li et al. 2025) quantizes the Linears in graph order and fits each
one to the *quantized* model's input ``X~`` (earlier Linears already quantized) with the
*float* model's result as the target. We also let the layer absorb the error of the residual
stream it is added to: when the Linear's only consumer is an ``Add(y, r)`` whose other input
``r`` is computed before the Linear, the target is the float ``X W + r`` and the quantized
side carries ``r~``:

    min_Wq || X~ Wq + r~ - (X W + r) ||^2

With ``E = X W + r - X~ W - r~`` and ``H~ = X~^T X~ / n`` this equals ``||X~ (Wq - W')||^2``
plus a constant, for ``W' = W + (H~ + lam * mean(diag H~) * I)^-1 X~^T E / n``: the
error-corrected weight, ridge-regularized by ``lam`` (:data:`RIDGE`; a few thousand
calibration tokens against K up to 1536 inputs overfit without it). GPTQ then quantizes
``W'`` under ``H~`` (:func:`passes.gptq.gptq_quantize`, same grid, act-order and refit).

Measured on MiniLM W2 g128 +hadamard, mean embedding cosine on 32 held-out sentences
(tools/accuracy_sweep.py). With 96 calibration sentences: GPTQ 0.8747, sequential GPTQ
(``X~`` only) 0.871, GPTAQ without the residual target 0.8938, with it 0.8988 (0.995 on the
calibration sentences themselves: the correction is data-hungry). With 267: GPTQ 0.8879,
GPTAQ 0.9206.

:class:`ErrorFeedbackQuantizer` is a :class:`passes.quantize_weights.LinearQuantizer`: it
relies on being called in graph order (as QuantizeWeightsPass does). It keeps a private copy
of the float graph whose Linear weights it replaces by their dequantized codes as it goes,
and runs both graphs forward over the calibration batches only as far as the next Linear,
keeping only values still to be read, so a whole model costs two forward passes over the
calibration set. A Linear asked for out of order (or twice) raises InvariantError.

Invariants: the graph given is never modified; the calibration rows are those of
:mod:`passes.calibrate` (token mask, sentinel rows dropped); a Linear that reads no clean
calibration row falls back to RTN (None), as GPTQ does.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from qcompile.errors import InputError, InvariantError
from qcompile.interpreter import run_node
from qcompile.ir import Graph

from .calibrate import row_selection, token_mask_input
from .gptq import gptq_quantize
from .rtn import PackedWeight

__all__ = ["RIDGE", "ErrorFeedbackQuantizer", "corrected_weight"]

logger = logging.getLogger(__name__)

RIDGE = 0.5  # lam above: MiniLM W2 g128 held-out cosine 0.9204 / 0.9206 / 0.9192 / 0.9168 at 0.3 / 0.5 / 1 / 2 (267 sentences)


def corrected_weight(w: np.ndarray, hessian: np.ndarray, x_quant: np.ndarray, error: np.ndarray,
                     ridge: float = RIDGE) -> np.ndarray:
    """``W + (H~ + ridge * mean(diag H~) I)^-1 X~^T E / n`` (float64).

    ``x_quant`` [n, K] is the quantized model's input and ``hessian`` its ``H~ = X~^T X~ / n``;
    ``error`` [n, N] is the target minus ``X~ W`` (what the layer should add to reproduce the
    float model)."""
    h = np.array(hessian, np.float64)
    h[np.diag_indices_from(h)] += ridge * max(float(np.mean(np.diag(h))), 1e-12)
    return np.asarray(w, np.float64) + np.linalg.solve(h, x_quant.T @ error / max(len(x_quant), 1))


class ErrorFeedbackQuantizer:
    """LinearQuantizer running GPTAQ over ``graph`` (the float graph QuantizeWeightsPass rewrites)."""

    method = "gptaq"

    def __init__(self, graph: Graph, feeds_list: Sequence[dict], *, act_order: bool = True,
                 percdamp: float | None = None, ridge: float = RIDGE, residual: bool = True,
                 token_mask: str | None = "auto"):
        if not feeds_list:
            raise InputError("--method gptaq needs calibration inputs")
        self.act_order, self.percdamp, self.ridge = act_order, percdamp, ridge
        self.float_sweep = _ForwardSweep(graph, feeds_list)
        self.quant_sweep = _ForwardSweep(graph.copy(), feeds_list)
        masks = [token_mask_input(graph, feeds, token_mask) for feeds in feeds_list]
        self.masks = [feeds[m] if m else None for feeds, m in zip(feeds_list, masks)]
        self.partner = _residual_partners(graph) if residual else {}
        self.linears = sum(node.op == "Linear" for node in graph.nodes)
        self.done = 0

    def quantize(self, node: str, w, bits: int, group_size: int, symmetric: bool,
                 clip_search: bool) -> PackedWeight | None:
        sweep = self.quant_sweep
        lin = sweep.node(node)
        names = [lin.inputs[0]] + ([self.partner[node]] if node in self.partner else [])
        float_rows = self._rows(self.float_sweep.values_before(node, names))
        quant_rows = self._rows(sweep.values_before(node, names))
        clean = np.logical_and.reduce([ok for ok, _ in float_rows + quant_rows])
        if not clean.any():
            logger.warning("GPTAQ: no clean calibration rows for '%s'; using RTN", node)
            sweep.replace_weight(node, None)
            return None
        x_float, x_quant = float_rows[0][1][clean], quant_rows[0][1][clean]
        w64 = np.asarray(w, np.float64)
        error = (x_float - x_quant) @ w64
        if len(names) > 1:  # the residual stream's error, for this layer to absorb
            error += float_rows[1][1][clean] - quant_rows[1][1][clean]
        hessian = x_quant.T @ x_quant / len(x_quant)
        target = corrected_weight(w64, hessian, x_quant, error, self.ridge).astype(np.float32)
        pw = gptq_quantize(target, hessian, bits, group_size, symmetric, clip_search,
                           act_order=self.act_order, percdamp=self.percdamp, name=node)
        sweep.replace_weight(node, pw.dequantize().astype(np.float32))
        self.done += 1
        logger.info("GPTAQ %d/%d '%s': %d rows, correction %.3f of |W|%s", self.done, self.linears, node,
                    len(x_quant), np.linalg.norm(target - w64) / max(np.linalg.norm(w64), 1e-30),
                    ", residual target" if len(names) > 1 else "")
        return pw

    def _rows(self, per_batch: list[list[np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per requested value: (clean flags, rows) of its unmasked rows over all batches."""
        out = []
        for k in range(len(per_batch[0])):
            picked = [row_selection(arrays[k], mask) for arrays, mask in zip(per_batch, self.masks)]
            out.append((np.concatenate([clean[keep] for _, keep, clean in picked]),
                        np.concatenate([rows[keep] for rows, keep, _ in picked]).astype(np.float64)))
        return out


def _residual_partners(graph: Graph) -> dict[str, str]:
    """Linear name -> the other input of the Add that is its only consumer, when that input is
    computed before the Linear (a residual stream the Linear's output is added to)."""
    consumers = graph.consumers()
    producer = {name: -1 for name in graph.inputs}
    producer.update({out: i for i, node in enumerate(graph.nodes) for out in node.outputs})
    out = {}
    for i, node in enumerate(graph.nodes):
        users = consumers.get(node.outputs[0], []) if node.op == "Linear" else []
        if len(users) != 1 or users[0].op != "Add" or node.outputs[0] in graph.outputs:
            continue
        other = [x for x in users[0].inputs if x != node.outputs[0]]
        if len(other) == 1 and producer.get(other[0], len(graph.nodes)) < i \
                and graph.type_of(other[0]).shape == graph.type_of(node.outputs[0]).shape:
            out[node.name] = other[0]
    return out


class _ForwardSweep:
    """Runs a graph forward over several feed dicts, up to a node, keeping only live values."""

    def __init__(self, graph: Graph, feeds_list: Sequence[dict]):
        self.graph = graph
        self.index = {n.name: i for i, n in enumerate(graph.nodes)}
        self.last_use: dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            for name in node.inputs:
                self.last_use[name] = i
        for name in graph.outputs:
            self.last_use[name] = len(graph.nodes)
        self.envs = [dict(feeds) for feeds in feeds_list]
        self.position = 0  # nodes before it have run in every env

    def node(self, name: str):
        if name not in self.index:
            raise InvariantError(f"GPTAQ: no Linear '{name}' in the calibration graph")
        return self.graph.nodes[self.index[name]]

    def values_before(self, name: str, values: Sequence[str]) -> list[list[np.ndarray]]:
        """Run up to (not including) node ``name``; return ``values`` for each feed dict."""
        stop = self.index[name]
        if stop < self.position:
            raise InvariantError(f"GPTAQ: Linear '{name}' asked for after later nodes ran (graph order required)")
        for i in range(self.position, stop):
            self._run(i)
        self.position = stop
        return [[env[v] for v in values] for env in self.envs]

    def replace_weight(self, name: str, weight: np.ndarray | None) -> None:
        """Give Linear ``name`` its quantized weight (None: keep it) and run it."""
        node = self.graph.nodes[self.index[name]]
        if weight is not None:
            self.graph.constants[node.inputs[1]] = weight
        self._run(self.index[name])
        self.position = self.index[name] + 1

    def _run(self, i: int) -> None:
        node = self.graph.nodes[i]
        constants = self.graph.constants
        for env in self.envs:
            args = [(constants[x] if x in constants else env[x]) if x else None for x in node.inputs]
            for value, array in zip(node.outputs, run_node(self.graph, node, args)):
                env[value] = array
            for x in node.inputs:
                if x and x not in constants and self.last_use.get(x, -1) <= i:
                    env.pop(x, None)
