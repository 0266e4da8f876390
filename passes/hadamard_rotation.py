"""HadamardRotationPass: y = x W + b  ->  y = (x R)(R^T W) + b, R orthogonal Hadamard.

R = kron(I, H_b) (:func:`qcompile.hadamard.hadamard`, normalized, so R R^T = I): a
Hadamard rotation of contiguous blocks of b input channels (b = K: one full rotation).
Rotating the K axis spreads activation and weight outliers over all channels of a block,
which lowers the error of a later weight (and activation) quantization; in float the
graph computes the same function up to rounding.

Rewrites, for each selected ``Linear(x, W, b?)`` (default: every float Linear whose K has
a Hadamard order; ``layers=`` restricts it by node name), tried in this order:

1. Offline (zero runtime cost). Walk back from x through a chain of ops that commute
   with a block rotation of the last axis, each intermediate value used once and not a
   graph output: Identity; Mul/Div by a one-element constant; Reshape (rotation blocks
   stay aligned when b divides every last dimension on the way); Transpose keeping the
   last axis last; MatMul(A, v) with v the right operand (A (v R) = (A v) R). If the
   chain starts at a ``Linear`` P (its output used only by the chain) and b = the largest
   Hadamard order dividing every last dimension seen is >= ``min_block``: fold R into
   P's weight columns and bias (W_P R, b_P R) and R^T into W's rows. MiniLM's attention
   value -> output projection is such a chain (through the heads reshape/transpose and
   probs @ V), with b = 32 = head size.
2. Online. Otherwise insert ``Hadamard(x) attrs: size=b, axis=-1`` (one node shared by
   every selected Linear reading x, placed before the first of them) and rotate each
   consumer's W rows offline (R^T W); b = K if K has a Hadamard order, else the largest
   order dividing K if >= ``min_block``.

Refusals (the Linear is left unchanged): a non-float or non-constant weight; a K with no
Hadamard block >= ``min_block``; ``online=False`` and no offline chain.

LayerNorm. LN(x) = gamma * C(x)/|C(x)| + beta is invariant under a rotation Q only if Q
commutes with mean-centering C (Q 1 = 1) and gamma is uniform and beta ~ 1; a Hadamard
matrix does not fix the ones vector, and MiniLM is post-LN BERT: every LN output is the
residual stream itself and feeds the next residual Add besides the Linears, so gamma and
beta cannot be folded away and the residual stream cannot be rotated offline (QuaRot's
pre-LN trick - fold gamma/beta into the next Linears, absorb mean-centering into the
writers of the stream, use RMSNorm - does not apply). This pass therefore never rotates
through a LayerNorm: Linears reading an LN output (Q, K, V, FFN-up) are rotated online
(case 2), once per LN output. Only a permutation commutes with LN (see
:mod:`passes.reorder_channels`).

Postconditions: outputs equal the input graph's up to float rounding; every inserted op is
a ``Hadamard``; ``graph.metadata["hadamard"]`` lists ``{node, mode, size[, producer]}``.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from qcompile.hadamard import hadamard_transform, is_supported, largest_supported_divisor
from qcompile.ir import Graph, Node, TensorType

from .base import Pass, PassResult

__all__ = ["HadamardRotationPass"]

logger = logging.getLogger(__name__)


class HadamardRotationPass(Pass):
    """Rotate the input channels of Linear layers by Hadamard matrices (offline where possible)."""

    name = "HadamardRotationPass"

    def __init__(self, layers=None, offline: bool = True, online: bool = True, min_block: int = 16):
        self.layers = None if layers is None else frozenset(layers)
        self.offline, self.online, self.min_block = offline, online, int(min_block)

    def call(self, graph: Graph) -> PassResult:
        g = graph.copy()
        record: list[dict] = []
        selected = [n for n in g.nodes if self._selected(g, n)]
        pending = []
        for node in selected:
            found = _offline_chain(g, node, self.min_block) if self.offline else None
            if found is None:
                pending.append(node)
                continue
            producer, block = found
            _rotate_columns(g, producer, block)
            _rotate_rows(g, node, block)
            record.append({"node": node.name, "mode": "offline", "size": block, "producer": producer.name})
        if self.online:
            record += _insert_online(g, pending, self.min_block)
        modified = bool(record)
        if modified:
            g.metadata["hadamard"] = list(g.metadata.get("hadamard", [])) + record
        logger.info("HadamardRotationPass: %d offline, %d online",
                    sum(r["mode"] == "offline" for r in record), sum(r["mode"] == "online" for r in record))
        return PassResult(g if modified else graph, modified)

    def _selected(self, g: Graph, node: Node) -> bool:
        if node.op != "Linear" or (self.layers is not None and node.name not in self.layers):
            return False
        if not g.is_constant(node.inputs[1]) or g.type_of(node.inputs[1]).dtype != "float32":
            return False
        return _block_for(g.type_of(node.inputs[1]).shape[0], self.min_block) > 0


def _block_for(k: int, min_block: int) -> int:
    """Full K when it has a Hadamard order, else the largest order dividing K; 0 if < min_block."""
    if is_supported(k):
        return k
    b = largest_supported_divisor(k)
    return b if b >= min_block else 0


# ---------------------------------------------------------------------------- offline chain
def _offline_chain(g: Graph, consumer: Node, min_block: int):
    """(producer Linear, block) when x's producer chain commutes with a block rotation."""
    users, producers = g.consumers(), g.producers()
    v = consumer.inputs[0]
    dims = [g.type_of(v).shape[-1]]
    while True:
        if v in g.outputs or v in g.inputs or len(users.get(v, [])) != 1 or v not in producers:
            return None
        node = producers[v]
        if node.op == "Linear":
            if not g.is_constant(node.inputs[1]):
                return None
            block = largest_supported_divisor(math.gcd(*dims))
            return (node, block) if block >= min_block else None
        nxt = _chain_step(g, node, v)
        if nxt is None:
            return None
        v = nxt
        dims.append(g.type_of(v).shape[-1])


def _chain_step(g: Graph, node: Node, out: str) -> str | None:
    """The input through which ``node`` commutes with a last-axis block rotation of ``out``."""
    if node.op in ("Identity", "Reshape"):
        return node.inputs[0]
    if node.op == "Transpose":
        perm = tuple(node.attrs["perm"])
        return node.inputs[0] if perm[-1] == len(perm) - 1 else None
    if node.op in ("Mul", "Div") and len(node.inputs) == 2:
        a, b = node.inputs
        scalar = lambda n: g.is_constant(n) and g.constants[n].size == 1  # noqa: E731
        if scalar(b) and not g.is_constant(a):
            return a
        if node.op == "Mul" and scalar(a) and not g.is_constant(b):
            return b
        return None
    if node.op == "MatMul" and len(node.inputs) == 2:
        a, b = node.inputs
        if g.is_constant(b) or len(g.type_of(b).shape) < 2 or a == b:
            return None
        return b
    return None


# ---------------------------------------------------------------------------- online
def _insert_online(g: Graph, pending: list[Node], min_block: int) -> list[dict]:
    groups: dict[tuple[str, int], list[Node]] = {}
    for node in pending:
        block = _block_for(g.type_of(node.inputs[1]).shape[0], min_block)
        if block:
            groups.setdefault((node.inputs[0], block), []).append(node)
    record = []
    for (x, block), nodes in groups.items():
        xt = g.type_of(x)
        base = g.fresh_name(f"{x}_hadamard")
        out = g.add_value(base, TensorType(xt.shape, xt.dtype))
        had = Node("Hadamard", g.fresh_name(f"{nodes[0].name}/hadamard"), [x], [out], {"size": block, "axis": -1})
        first = min(g.nodes.index(n) for n in nodes)
        g.nodes.insert(first, had)
        for node in nodes:
            node.inputs[0] = out
            _rotate_rows(g, node, block)
            record.append({"node": node.name, "mode": "online", "size": block, "hadamard": had.name})
    return record


# ---------------------------------------------------------------------------- weights
def _rotate_rows(g: Graph, node: Node, block: int) -> None:
    """W <- R^T W (R = kron(I, H_block) on W's rows)."""
    w = g.constants[node.inputs[1]]
    _replace_const(g, node, 1, np.ascontiguousarray(hadamard_transform(w.T, block).T))


def _rotate_columns(g: Graph, node: Node, block: int) -> None:
    """W <- W R and b <- b R (the producer's output channels)."""
    _replace_const(g, node, 1, hadamard_transform(g.constants[node.inputs[1]], block))
    if len(node.inputs) > 2 and node.inputs[2]:
        _replace_const(g, node, 2, hadamard_transform(g.constants[node.inputs[2]], block))


def _replace_const(g: Graph, node: Node, index: int, array: np.ndarray) -> None:
    """Give ``node`` a fresh constant (the old one may be shared); drop the old if unused."""
    old = node.inputs[index]
    node.inputs[index] = g.add_constant(g.fresh_name(f"{old}_rot"), array.astype(g.constants[old].dtype))
    if old not in g.outputs and not any(old in n.inputs for n in g.nodes):
        g.constants.pop(old, None)
        g.values.pop(old, None)
