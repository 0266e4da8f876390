"""ReorderChannelsPass: permute activation channels so outlier channels are contiguous.

The permutation is folded into constants at compile time; the rewritten graph has the
same ops as the input (no Gather/Transpose is ever inserted) and computes the same
function up to float rounding.

Steps:

1. Analysis (:func:`passes.channel_spaces.find_spaces`): group activations into channel
   spaces that must share one permutation pi: through Linear (producer columns + bias,
   consumer rows), LayerNorm (gamma/beta; LN over the permuted axis is invariant),
   elementwise ops (Gelu, Add of two permuted streams, Mul by permuted constants),
   residual streams (every tensor joined by an Add gets the same pi), attention
   (pi restricted to within-head blocks, shared by Q and K; V with the output projection).
2. Calibration: run the reference interpreter (``keep_all=True``) on the calibration feeds;
   the magnitude of channel c of a space is max |x_c| over every Linear input in it.
3. pi sorts channels by decreasing magnitude (within each head block where restricted),
   so outliers are contiguous at the start of each block.
4. Folding, all on fresh constants (originals may be shared): Linear W rows for the
   space's consumers, W columns and bias for its producers (composed when a Linear sits
   on two spaces), LayerNorm gamma/beta, elementwise constants and Gather tables along the
   channel axes.

Refusals (the space keeps its order; reasons in ``graph.metadata["reorder"]["refused"]``):
the space touches a graph input or output (MiniLM's residual stream reaches the pooled
embedding, so it stays unpermuted), an op that mixes channels in an unsupported way
(QLinear, Conv, Hadamard, a Reshape moving the channel, ...), or it holds no Linear input
(nothing to gain, e.g. the Q/K space of attention). A space whose sorted order is the
identity changes nothing.

Postcondition: ``graph.metadata["reorder"]`` = ``{"spaces": [{size, block, perm,
consumers, producers}], "refused": [{consumers, producers, reason}]}``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from qcompile.errors import InputError
from qcompile.ir import Graph

from .base import Pass, PassResult
from .channel_spaces import ChannelSpace, find_spaces

__all__ = ["ReorderChannelsPass", "sorted_permutation", "permute_axes", "channel_magnitude"]

logger = logging.getLogger(__name__)


class ReorderChannelsPass(Pass):
    """Sort channels by calibrated magnitude, folding the permutation into constants."""

    name = "ReorderChannelsPass"

    def __init__(self, calibration: dict | Sequence[dict]):
        feeds = [calibration] if isinstance(calibration, dict) else list(calibration)
        if not feeds:
            raise InputError("ReorderChannelsPass needs at least one calibration feed dict")
        self.feeds = feeds

    def call(self, graph: Graph) -> PassResult:
        spaces = find_spaces(graph)
        wanted = [s for s in spaces if not s.refusals and s.rows]
        magnitudes = _calibrate(graph, wanted, self.feeds) if wanted else []
        g = graph.copy()
        row_perm: dict[str, np.ndarray] = {}
        col_perm: dict[str, np.ndarray] = {}
        chosen = []
        for space, mag in zip(wanted, magnitudes):
            perm = sorted_permutation(mag, space.block_size)
            if np.array_equal(perm, np.arange(space.size)):
                continue
            for name in space.rows:
                row_perm[name] = perm
            for name in space.cols:
                col_perm[name] = perm
            _permute_consts(g, space, perm)
            chosen.append({"size": space.size, "block": space.block_size, "perm": perm.tolist(),
                           "consumers": list(space.rows), "producers": list(space.cols)})
        _permute_linears(g, row_perm, col_perm)
        refused = [{"consumers": s.rows, "producers": s.cols,
                    "reason": s.refusals[0] if s.refusals else "no Linear input in the space"}
                   for s in spaces if s.refusals or not s.rows]
        logger.info("ReorderChannelsPass: %d spaces permuted, %d refused", len(chosen), len(refused))
        if not chosen:
            return PassResult(graph, False)
        g.metadata["reorder"] = {"spaces": chosen, "refused": refused}
        return PassResult(g, True)


def sorted_permutation(magnitude: np.ndarray, block: int) -> np.ndarray:
    """pi with channels by decreasing magnitude inside each block of ``block`` channels."""
    size = magnitude.shape[0]
    blocks = magnitude.reshape(size // block, block)
    order = np.argsort(-blocks, axis=1, kind="stable")
    return (order + np.arange(0, size, block)[:, None]).reshape(size).astype(np.int64)


def permute_axes(array: np.ndarray, axes: tuple[int, ...], perm: np.ndarray) -> np.ndarray:
    """out[.., c, ..] = array[.., perm[c], ..] with c the row-major index over ``axes``."""
    k = len(axes)
    moved = np.moveaxis(array, axes, range(array.ndim - k, array.ndim))
    lead = moved.shape[: array.ndim - k]
    flat = moved.reshape(*lead, -1)[..., perm]
    return np.ascontiguousarray(np.moveaxis(flat.reshape(moved.shape), range(array.ndim - k, array.ndim), axes))


def channel_magnitude(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """max |x| per channel (row-major over ``axes``), reduced over every other axis."""
    k = len(axes)
    moved = np.moveaxis(np.abs(array), axes, range(array.ndim - k, array.ndim))
    return moved.reshape(-1, int(np.prod(moved.shape[array.ndim - k:]))).max(axis=0)


def _calibrate(graph: Graph, spaces: list[ChannelSpace], feeds: list[dict]) -> list[np.ndarray]:
    from qcompile.interpreter import run

    nodes = {n.name: n for n in graph.nodes}
    mags = [np.zeros(s.size, dtype=np.float64) for s in spaces]
    for feed in feeds:
        env = run(graph, feed, keep_all=True)
        for space, mag in zip(spaces, mags):
            for name in space.rows:
                x = nodes[name].inputs[0]
                np.maximum(mag, channel_magnitude(env[x], space.values[x]), out=mag)
        del env
    return mags


def _permute_consts(g: Graph, space: ChannelSpace, perm: np.ndarray) -> None:
    nodes = {n.name: n for n in g.nodes}
    for (node_name, index), axes in space.consts.items():
        node = nodes[node_name]
        _replace(g, node, index, permute_axes(g.constants[node.inputs[index]], axes, perm))


def _permute_linears(g: Graph, row_perm: dict, col_perm: dict) -> None:
    for node in g.nodes:
        rows, cols = row_perm.get(node.name), col_perm.get(node.name)
        if node.op != "Linear" or (rows is None and cols is None):
            continue
        w = g.constants[node.inputs[1]]
        w = w[rows] if rows is not None else w
        _replace(g, node, 1, w[:, cols] if cols is not None else w)
        if cols is not None and len(node.inputs) > 2 and node.inputs[2]:
            _replace(g, node, 2, g.constants[node.inputs[2]][cols])


def _replace(g: Graph, node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    node.inputs[index] = g.add_constant(g.fresh_name(f"{old}_perm"), np.ascontiguousarray(array))
    if old not in g.outputs and not any(old in n.inputs for n in g.nodes):
        g.constants.pop(old, None)
        g.values.pop(old, None)
