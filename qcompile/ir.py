"""qcompile's IR: a static-shape dataflow graph of named values.

Invariants (checked by :func:`verify`):

1. Every value name used by a node, graph input or graph output is declared in
   ``graph.values`` with a :class:`TensorType` whose shape is fully static (ints >= 0).
2. Each value has exactly one producer: a graph input, a constant (``graph.constants``),
   or one node output. ``""`` in a node's inputs marks an absent optional input.
3. ``graph.nodes`` is in topological order; node names are unique.
4. Every constant's array matches its declared dtype and shape.
5. A value carrying a :class:`QuantSpec` is a packed low-bit tensor; its logical
   (unpacked) shape is ``quant.logical_shape``.

Op semantics follow ONNX with all shape-like operands made static attributes; the op set
and the attribute names are listed in :mod:`qcompile.ops`. networkx is used for graph
algorithms (:func:`to_networkx`), never as storage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .errors import InvariantError

__all__ = ["TensorType", "QuantSpec", "Value", "Node", "Graph", "verify", "to_networkx"]


@dataclass(frozen=True)
class TensorType:
    """Static shape and numpy dtype name (``"float32"``, ``"int64"``, ``"uint8"``, ...)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class QuantSpec:
    """How a packed integer tensor encodes a logical real tensor.

    ``logical_shape`` is the unpacked shape, e.g. ``(K, N)`` for a linear weight.
    ``axis`` is the axis that groups run along (the reduction axis K for weights);
    ``group_size`` 0 means one group spanning the whole axis (per output channel).
    real = (q - zero_point) * scale, q unsigned in [0, 2**bits); symmetric schemes use
    zero_point = 2**(bits-1). ``packing`` names the byte layout (see :mod:`qcompile.quant`).
    """

    bits: int
    symmetric: bool
    axis: int
    group_size: int
    logical_shape: tuple[int, ...]
    packing: str = "n_major_lsb_first"
    method: str = "rtn"


@dataclass(slots=True, eq=False)
class Value:
    name: str
    type: TensorType
    quant: QuantSpec | None = None


@dataclass(slots=True, eq=False)
class Node:
    """One operation. ``outputs`` are fixed at creation; attributes are plain Python data."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Graph:
    name: str
    inputs: list[str]
    outputs: list[str]
    nodes: list[Node]
    values: dict[str, Value]
    constants: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- queries -----------------------------------------------------------------
    def type_of(self, name: str) -> TensorType:
        return self.values[name].type

    def producers(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    users.setdefault(name, []).append(node)
        return users

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    # -- mutation helpers ----------------------------------------------------------
    def add_value(self, name: str, ttype: TensorType, quant: QuantSpec | None = None) -> str:
        if name in self.values:
            raise InvariantError(f"value '{name}' declared twice")
        self.values[name] = Value(name, ttype, quant)
        return name

    def add_constant(self, name: str, array: np.ndarray, quant: QuantSpec | None = None) -> str:
        array = np.asarray(array)
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
            array = array.copy(order="C")
        self.add_value(name, TensorType(tuple(int(d) for d in array.shape), str(array.dtype)), quant)
        self.constants[name] = array
        return name

    def fresh_name(self, base: str) -> str:
        if base not in self.values and all(n.name != base for n in self.nodes):
            return base
        i = 1
        while f"{base}_{i}" in self.values:
            i += 1
        return f"{base}_{i}"

    def remove_unused(self) -> None:
        """Drop nodes whose outputs are never used, then constants/values nobody uses."""
        live = set(self.outputs)
        kept: list[Node] = []
        for node in reversed(self.nodes):
            if any(o in live for o in node.outputs):
                kept.append(node)
                live.update(i for i in node.inputs if i)
        self.nodes = kept[::-1]
        live.update(self.inputs)
        for name in list(self.constants):
            if name not in live:
                del self.constants[name]
        for name in list(self.values):
            if name not in live:
                del self.values[name]

    def copy(self) -> "Graph":
        """Deep copy of structure; constant arrays are shared (treat them as immutable)."""
        return Graph(
            self.name,
            list(self.inputs),
            list(self.outputs),
            [Node(n.op, n.name, list(n.inputs), list(n.outputs), copy.deepcopy(n.attrs)) for n in self.nodes],
            {k: Value(v.name, v.type, v.quant) for k, v in self.values.items()},
            dict(self.constants),
            copy.deepcopy(self.metadata),
        )

    def weight_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.constants.values()))

    def summary(self) -> str:
        from collections import Counter

        ops = Counter(n.op for n in self.nodes)
        return f"graph '{self.name}': {len(self.nodes)} nodes ({', '.join(f'{k} x{v}' for k, v in sorted(ops.items()))})"


def verify(graph: Graph) -> None:
    """Raise :class:`InvariantError` if ``graph`` breaks one of the module's invariants."""
    defined: set[str] = set()
    for name in graph.inputs:
        _check_declared(graph, name, "graph input")
        defined.add(name)
    for name, array in graph.constants.items():
        _check_declared(graph, name, "constant")
        t = graph.values[name].type
        if tuple(array.shape) != t.shape or str(array.dtype) != t.dtype:
            raise InvariantError(f"constant '{name}' is {array.dtype}{list(array.shape)}, declared {t}")
        defined.add(name)
    seen_nodes: set[str] = set()
    for node in graph.nodes:
        if node.name in seen_nodes:
            raise InvariantError(f"node name '{node.name}' is not unique")
        seen_nodes.add(node.name)
        for name in node.inputs:
            if name and name not in defined:
                raise InvariantError(f"node '{node.name}' ({node.op}) uses '{name}' before it is defined")
        for name in node.outputs:
            _check_declared(graph, name, f"output of node '{node.name}' ({node.op})")
            if name in defined:
                raise InvariantError(f"value '{name}' has two producers (node '{node.name}')")
            defined.add(name)
    for name in graph.outputs:
        if name not in defined:
            raise InvariantError(f"graph output '{name}' is never produced")


def _check_declared(graph: Graph, name: str, what: str) -> None:
    value = graph.values.get(name)
    if value is None:
        raise InvariantError(f"{what} '{name}' has no declared type")
    if not all(isinstance(d, int) and d >= 0 for d in value.type.shape):
        raise InvariantError(f"{what} '{name}' has a non-static shape {value.type.shape}")


def to_networkx(graph: Graph):
    """A networkx DiGraph over node names (edges follow dataflow), for graph algorithms."""
    import networkx as nx

    g = nx.DiGraph()
    producers = graph.producers()
    for node in graph.nodes:
        g.add_node(node.name, op=node.op)
        for name in node.inputs:
            if name in producers:
                g.add_edge(producers[name].name, node.name, value=name)
    return g


def iter_ops(graph: Graph, ops: Iterable[str]):
    wanted = set(ops)
    return (n for n in graph.nodes if n.op in wanted)
