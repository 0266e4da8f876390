"""Channel spaces: which activations must share one channel permutation, and what folds it.

A *channel space* is a connected set of float activations whose channel axes (an ordered
tuple of axes, flattened row-major into one channel index of size C) must all be permuted
by the same permutation pi for the graph to compute the same function when only constants
are changed. :func:`find_spaces` grows one space from every Linear input and output by
the rules below; Linear layers are the boundaries where a permutation is folded into
weights, so spaces stop there.

Rules (``v`` is the value being visited, ``ax`` its channel axes):

1. Linear(x, W, b): x with ax = (last,) -> permute W rows; output with ax = (last,) ->
   permute W columns and b. Nothing crosses the Linear.
2. Unary elementwise, Gelu, Clip, Cast, Identity, Softmax (any axis: equivariant both
   along and across the channel): the other side has the same axes.
3. Binary elementwise and Where (broadcasting): operands carrying the channel axes at full
   size join the space (constants are permuted); operands broadcast along every channel
   axis (size 1 or missing) are independent; anything in between is refused.
4. LayerNorm: channel axes inside the normalised axes (mean/variance are permutation
   invariant); scale/bias are permuted.
5. Reductions: over no channel axis -> the output keeps the channel; over every channel
   axis -> the output has none (sum/mean/max/min/L2 are symmetric); else refused.
6. Reshape: channel axes must be trailing on both sides (e.g. [.., 384] <-> [.., 12, 32]).
   Whenever the channel spans several axes, the permutation must keep the outer
   coordinates (heads): it is restricted to blocks of the innermost channel dimension.
7. Transpose: axes follow the permutation. Slice / Concat: along non-channel axes only.
   Expand: an input broadcast along the channel is independent.
8. MatMul(A, B) of two activations: channels on the contraction axis (A's last, B's
   second-to-last) join A and B (scores = Q K^T per head); channels on B's last axis
   (or A's row axis) pass to the output (probs @ V). Others are refused.
9. Gather(table, ids) with a constant table: the table's non-gathered axes are permuted.
10. Everything else (QLinear, Conv, Hadamard, quantization ops, ...), graph inputs and
    graph outputs: the space is *refused* (no runtime gather is ever inserted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qcompile import ops
from qcompile.ir import Graph, Node

__all__ = ["ChannelSpace", "find_spaces"]

_SAME = ops.ELEMENTWISE_UNARY | {"Gelu", "Clip", "Cast", "Softmax", "Identity"}
_BINARY = ops.ELEMENTWISE_BINARY | {"Where"}


@dataclass
class ChannelSpace:
    size: int
    values: dict[str, tuple[int, ...]] = field(default_factory=dict)
    block: int = 0  # permutations keep blocks of this size (0: unrestricted until set)
    rows: list[str] = field(default_factory=list)  # Linear nodes: permute W rows
    cols: list[str] = field(default_factory=list)  # Linear nodes: permute W columns + bias
    consts: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)  # (node, input) -> axes
    refusals: list[str] = field(default_factory=list)

    @property
    def block_size(self) -> int:
        return self.block or self.size


def find_spaces(graph: Graph) -> list[ChannelSpace]:
    """Every channel space touching a float Linear (see the module docstring)."""
    walker = _Walker(graph)
    spaces = []
    for node in graph.nodes:
        if node.op != "Linear" or not graph.is_constant(node.inputs[1]):
            continue
        for v in (node.inputs[0], node.outputs[0]):
            if v not in walker.assigned:
                spaces.append(walker.grow(v, (len(graph.type_of(v).shape) - 1,)))
    return spaces


class _Walker:
    def __init__(self, graph: Graph):
        self.g = graph
        self.producers, self.users = graph.producers(), graph.consumers()
        self.assigned: set[str] = set()

    def grow(self, seed: str, axes: tuple[int, ...]) -> ChannelSpace:
        shape = self.g.type_of(seed).shape
        self.space = ChannelSpace(math.prod(shape[a] for a in axes))
        self.queue = [(seed, axes)]
        while self.queue:
            v, ax = self.queue.pop()
            known = self.space.values.get(v)
            if known is not None:
                if known != ax:
                    self.refuse(f"value '{v}' reached with channel axes {known} and {ax}")
                continue
            self.space.values[v] = ax
            self.assigned.add(v)
            self.visit(v, ax)
        return self.space

    # -- recording -------------------------------------------------------------
    def refuse(self, reason: str) -> None:
        self.space.refusals.append(reason)

    def link(self, v: str, ax) -> None:
        if ax is None:
            return
        if self.g.is_constant(v):
            self.refuse(f"constant '{v}' reached as an activation")
            return
        shape = self.shape(v)
        if any(not 0 <= x < len(shape) for x in ax) or math.prod(shape[x] for x in ax) != self.space.size:
            self.refuse(f"'{v}' would carry the channel on axes {tuple(ax)} of shape {shape}")
            return
        self.queue.append((v, tuple(ax)))

    def restrict(self, ax, shape) -> None:
        if len(ax) > 1:
            inner = shape[ax[-1]]
            self.space.block = math.gcd(self.space.block, inner) if self.space.block else inner

    def shape(self, v: str) -> tuple[int, ...]:
        return self.g.type_of(v).shape

    # -- traversal -------------------------------------------------------------
    def visit(self, v: str, ax) -> None:
        if v in self.g.inputs or v in self.g.outputs:
            self.refuse(f"'{v}' is a graph {'input' if v in self.g.inputs else 'output'}")
        if v in self.producers:
            self.rule(self.producers[v], v, ax)
        for node in self.users.get(v, []):
            self.rule(node, v, ax)

    def rule(self, node: Node, v: str, ax) -> None:
        op = node.op
        if op == "Linear":
            self.linear(node, v, ax)
        elif op in _SAME:
            other = node.outputs[0] if v != node.outputs[0] else node.inputs[0]
            self.link(other, ax)
        elif op in _BINARY:
            self.broadcast(node, v, ax, range(len(node.inputs)))
        elif op == "LayerNorm":
            self.layer_norm(node, v, ax)
        elif op in ops.REDUCTIONS:
            self.reduction(node, v, ax)
        elif op == "Reshape":
            self.reshape(node, v, ax)
        elif op == "Transpose":
            perm = tuple(node.attrs["perm"])
            if v == node.outputs[0]:
                self.link(node.inputs[0], [perm[a] for a in ax])
            else:
                self.link(node.outputs[0], [perm.index(a) for a in ax])
        elif op == "MatMul":
            self.matmul(node, v, ax)
        elif op == "Gather":
            self.gather(node, v, ax)
        elif op in ("Slice", "Concat"):
            cut = set(node.attrs["axes"]) if op == "Slice" else {node.attrs["axis"]}
            rank = len(self.shape(v))
            if {c % rank for c in cut} & set(ax):
                self.refuse(f"{op} '{node.name}' along a channel axis")
            else:
                self.broadcast(node, v, ax, range(len(node.inputs)))
        elif op == "Expand":
            self.broadcast(node, v, ax, [0])
        else:
            self.refuse(f"op {op} (node '{node.name}') is not permutation-equivariant here")

    def linear(self, node: Node, v: str, ax) -> None:
        last = (len(self.shape(v)) - 1,)
        if tuple(ax) != last or not self.g.is_constant(node.inputs[1]):
            self.refuse(f"Linear '{node.name}' reached on axes {ax}")
        elif v == node.outputs[0]:
            self.space.cols.append(node.name)
        elif v == node.inputs[0]:
            self.space.rows.append(node.name)
        else:
            self.refuse(f"Linear '{node.name}' has an activation weight")

    def broadcast(self, node: Node, v: str, ax, operands) -> None:
        """Numpy broadcasting: map ``ax`` to the output, then to every operand."""
        out = node.outputs[0]
        r = len(self.shape(out))
        out_ax = ax if v == out else [a + r - len(self.shape(v)) for a in ax]
        if v != out:
            self.link(out, out_ax)
        for i in operands:
            name = node.inputs[i]
            if not name or name == v:
                continue
            shp = self.shape(name)
            mapped = [a - (r - len(shp)) for a in out_ax]
            full = [m >= 0 and shp[m] == self.shape(out)[a] for m, a in zip(mapped, out_ax)]
            if all(full):
                if self.g.is_constant(name):
                    self.space.consts[(node.name, i)] = tuple(mapped)
                else:
                    self.link(name, mapped)
            elif any(m >= 0 and shp[m] != 1 for m in mapped):
                self.refuse(f"operand '{name}' of '{node.name}' partly broadcast along the channel")

    def layer_norm(self, node: Node, v: str, ax) -> None:
        r = len(self.shape(v))
        if any(a < node.attrs["axis"] % r for a in ax):
            self.refuse(f"LayerNorm '{node.name}' does not normalise over the channel axes")
            return
        self.broadcast(node, v, ax, range(len(node.inputs)))

    def reduction(self, node: Node, v: str, ax) -> None:
        x, out = node.inputs[0], node.outputs[0]
        r = len(self.shape(x))
        red = {a % r for a in node.attrs["axes"]} if node.attrs.get("axes") else set(range(r))
        keep = bool(node.attrs.get("keepdims", True))
        kept = [a for a in range(r) if a not in red]
        if v == out:
            self.link(x, ax if keep else [kept[a] for a in ax])
        elif set(ax) <= red:
            return  # symmetric reduction over the whole channel: output independent of pi
        elif set(ax) & red:
            self.refuse(f"{node.op} '{node.name}' reduces part of the channel axes")
        else:
            self.link(out, ax if keep else [kept.index(a) for a in ax])

    def reshape(self, node: Node, v: str, ax) -> None:
        x, out = node.inputs[0], node.outputs[0]
        src, dst = (x, out) if v == x else (out, x)
        mapped = _trailing_map(self.shape(src), ax, self.shape(dst))
        if mapped is None:
            self.refuse(f"Reshape '{node.name}' moves the channel axes {ax}")
            return
        self.restrict(ax, self.shape(src))
        self.restrict(mapped, self.shape(dst))
        self.link(dst, mapped)

    def matmul(self, node: Node, v: str, ax) -> None:
        a, b = node.inputs
        out = node.outputs[0]
        if self.g.is_constant(a) or self.g.is_constant(b) or a == b:
            self.refuse(f"MatMul '{node.name}' with a constant or a squared operand")
            return
        ra, rb, r = len(self.shape(a)), len(self.shape(b)), len(self.shape(out))
        if len(self.shape(a)) < 2 or rb < 2:
            self.refuse(f"MatMul '{node.name}' on vectors")
            return
        # per operand: (contraction axis, free axis, offset of its batch axes in the output)
        role = {a: (ra - 1, ra - 2, r - ra), b: (rb - 2, rb - 1, r - rb)}
        free_out = {a: r - 2, b: r - 1}
        s = set(ax)
        if v == out:
            src = b if (r - 1) in s and (r - 2) not in s else a if (r - 2) in s and (r - 1) not in s else None
            if src is None:
                self.refuse(f"MatMul '{node.name}' output channel spans rows and columns")
                return
            k, f, off = role[src]
            self.link(src, [f if x == free_out[src] else x - off for x in ax])
            self.restrict(ax, self.shape(out))
            return
        other = b if v == a else a
        k, f, off = role[v]
        if k in s and f not in s:  # contraction: the other operand shares pi
            ko, fo, offo = role[other]
            self.link(other, [ko if x == k else x + off - offo for x in ax])
        elif f in s and k not in s:
            self.link(out, [free_out[v] if x == f else x + off for x in ax])
        else:
            self.refuse(f"MatMul '{node.name}' mixes the channel with both matrix axes")
            return
        self.restrict(ax, self.shape(v))

    def gather(self, node: Node, v: str, ax) -> None:
        data, idx = node.inputs
        axis = node.attrs.get("axis", 0) % len(self.shape(data))
        ni = len(self.shape(idx))
        if v != node.outputs[0]:
            self.refuse(f"Gather '{node.name}' reached from its input")
            return
        if any(axis <= a < axis + ni for a in ax):
            self.refuse(f"Gather '{node.name}' gathers along the channel")
            return
        mapped = tuple(a if a < axis else a - ni + 1 for a in ax)
        if self.g.is_constant(data):
            self.space.consts[(node.name, 0)] = mapped
        else:
            self.link(data, mapped)


def _trailing_map(src_shape, ax, dst_shape):
    """Channel axes of a reshape's other side, when they are trailing on both sides."""
    n = len(ax)
    if tuple(ax) != tuple(range(len(src_shape) - n, len(src_shape))):
        return None
    size = math.prod(src_shape[a] for a in ax)
    for k in range(len(dst_shape) - 1, -1, -1):
        tail = math.prod(dst_shape[k:])
        if tail == size:
            return tuple(range(k, len(dst_shape)))
        if tail > size:
            return None
    return None
