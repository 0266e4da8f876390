"""Tiny hand-built graphs shared by the Hadamard rotation and channel reorder tests."""

from __future__ import annotations

import numpy as np

from qcompile.interpreter import run
from qcompile.ir import Graph, Node, TensorType, verify

__all__ = ["GraphBuilder", "structure", "assert_same_outputs", "random_feeds"]


class GraphBuilder:
    """Declare values and constants, append nodes; ``build()`` verifies the graph."""

    def __init__(self, inputs: dict, seed: int = 0):
        self.g = Graph("t", list(inputs), [], [], {}, {})
        self.rng = np.random.default_rng(seed)
        for name, shape in inputs.items():
            self.g.add_value(name, TensorType(tuple(shape), "float32"))

    def const(self, name, shape=None, array=None, scale=1.0):
        if array is None:
            array = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        return self.g.add_constant(name, np.asarray(array, dtype=np.float32))

    def node(self, op, name, inputs, out, out_shape, **attrs):
        self.g.add_value(out, TensorType(tuple(out_shape), "float32"))
        self.g.nodes.append(Node(op, name, list(inputs), [out], attrs))
        return out

    def linear(self, name, x, k, n, lead, bias=True):
        w = self.const(f"{name}.w", (k, n), scale=1 / np.sqrt(k))
        ins = [x, w] + ([self.const(f"{name}.b", (n,), scale=0.1)] if bias else [])
        return self.node("Linear", name, ins, f"{name}.out", (*lead, n))

    def build(self, outputs) -> Graph:
        self.g.outputs = list(outputs)
        verify(self.g)
        return self.g


def structure(graph: Graph) -> list[tuple]:
    return [(n.op, n.name, tuple(n.inputs), tuple(n.outputs)) for n in graph.nodes]


def random_feeds(graph: Graph, seed: int = 1, outlier_channels=()) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in graph.inputs:
        x = rng.standard_normal(graph.type_of(name).shape).astype(np.float32)
        for c in outlier_channels:
            x[..., c] *= 20
        feeds[name] = x
    return feeds


def assert_same_outputs(before: Graph, after: Graph, feeds: dict, tol: float = 1e-5) -> None:
    want, got = run(before, feeds), run(after, feeds)
    for name in before.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol)
