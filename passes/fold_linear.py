"""FoldLinearPass: MatMul with a constant 2-D weight (+ a constant bias Add) -> Linear.

Rewrites, in this order (the pass is functional: it works on ``graph.copy()``):

1. ``MatMul(x, W)``, W a 2-D float constant [K, N], x of rank >= 2 and the same dtype
   -> ``Linear(x, W)`` (same node name, same output value).
2. ``Linear(x, W)`` (no bias) whose output y feeds exactly one node, ``Add(y, b)`` or
   ``Add(b, y)``, with b a constant of W's dtype and shape [N] or [1, .., 1, N] (rank <=
   rank of y), y not a graph output -> ``Linear(x, W, b')`` producing the Add's output;
   b' is b reshaped to [N]. The Add node and the value y disappear.

Refusals (the node is left unchanged): W not a constant, W not 2-D or not float, x of
rank < 2, a bias that is not a per-column vector, the Add output differing in shape from
y, y with other users or listed as a graph output.

Postcondition: graph outputs are numerically equal up to float reassociation; every
Linear's weight is a 2-D constant and its bias (if any) a constant [N].
"""

from __future__ import annotations

import logging

import numpy as np

from qcompile.ir import Graph, Node

from .base import Pass, PassResult

__all__ = ["FoldLinearPass"]

logger = logging.getLogger(__name__)


class FoldLinearPass(Pass):
    """MatMul(x, W const) -> Linear; Linear + Add(const bias) -> Linear with bias."""

    name = "FoldLinearPass"

    def call(self, graph: Graph) -> PassResult:
        g = graph.copy()
        n_linear = sum(_try_matmul_to_linear(g, i) for i in range(len(g.nodes)))
        n_bias = 0
        i = 0
        while i < len(g.nodes):
            n_bias += _try_fold_bias(g, i)
            i += 1
        logger.info("FoldLinearPass: %d MatMul -> Linear, %d bias Add folded", n_linear, n_bias)
        modified = bool(n_linear or n_bias)
        return PassResult(g if modified else graph, modified)


def _is_float(dtype: str) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def _try_matmul_to_linear(g: Graph, index: int) -> bool:
    node = g.nodes[index]
    if node.op != "MatMul" or len(node.inputs) != 2:
        return False
    x, w = node.inputs
    if not g.is_constant(w) or g.is_constant(x):
        return False
    wt, xt = g.type_of(w), g.type_of(x)
    if len(wt.shape) != 2 or not _is_float(wt.dtype) or len(xt.shape) < 2 or xt.dtype != wt.dtype:
        return False
    g.nodes[index] = Node("Linear", node.name, [x, w], list(node.outputs), {})
    return True


def _try_fold_bias(g: Graph, index: int) -> bool:
    """Fold the bias Add after the bias-less Linear at ``g.nodes[index]``; remove the Add."""
    node = g.nodes[index]
    if node.op != "Linear" or (len(node.inputs) > 2 and node.inputs[2]):
        return False
    (y,) = node.outputs
    users = [n for n in g.nodes if y in n.inputs]
    if y in g.outputs or len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2:
        return False
    add = users[0]
    a, b = add.inputs
    bias = b if a == y else a
    if bias == y or not g.is_constant(bias):
        return False
    n = g.type_of(node.inputs[1]).shape[1]
    yt, bt, out_t = g.type_of(y), g.type_of(bias), g.type_of(add.outputs[0])
    per_column = bt.shape[-1:] == (n,) and all(d == 1 for d in bt.shape[:-1]) and len(bt.shape) <= len(yt.shape)
    if not per_column or bt.dtype != yt.dtype or out_t != yt:
        return False
    bias_vec = _bias_vector(g, bias, n)
    g.nodes[index] = Node("Linear", node.name, [node.inputs[0], node.inputs[1], bias_vec], list(add.outputs), {})
    g.nodes.remove(add)
    del g.values[y]
    _drop_if_unused(g, bias)
    return True


def _bias_vector(g: Graph, bias: str, n: int) -> str:
    if g.type_of(bias).shape == (n,):
        return bias
    return g.add_constant(g.fresh_name(f"{bias}_vec"), g.constants[bias].reshape(n))


def _drop_if_unused(g: Graph, name: str) -> None:
    if name in g.outputs or any(name in node.inputs for node in g.nodes):
        return
    g.constants.pop(name, None)
    g.values.pop(name, None)
