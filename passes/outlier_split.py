"""SplitOutlierGroupsPass: give a Linear's leading outlier input-channel groups their own Linear.

Used for ``--outlier-bits B``: after :class:`passes.reorder_channels.ReorderChannelsPass`
has sorted the channels of a space by decreasing calibrated magnitude, the outliers of a
Linear's input sit in its first rows of W. This pass cuts those rows off, aligned to the
weight group size, so that the quantizer can give the outlier piece more bits than the rest
(e.g. a 2-bit model whose few outlier groups are 4-bit); the packed QLinear format keeps one
width per node, so per-group widths are expressed as two nodes.

Rewrite (functional; the function is preserved up to float rounding):

1. ``Linear(x[..., K], W[K, N], b?) -> y`` becomes
   ``Slice(x)[..., :Ko] -> x_o``, ``Slice(x)[..., Ko:] -> x_r``,
   ``Linear(x_o, W[:Ko]) -> y_o`` (node ``<name>.outliers``),
   ``Linear(x_r, W[Ko:], b?) -> y_r`` (node ``<name>``, keeping the original name) and
   ``Add(y_o, y_r) -> y``. ``Ko`` is a multiple of ``group_size`` (K itself when 0 is not
   allowed: a per-channel grid has no group boundary, so such Linears are refused).
2. ``Ko`` = the number of leading groups whose largest calibrated channel magnitude
   (max |x_c| over the calibration feeds) is at least ``ratio`` times the median channel
   magnitude of the whole input, stopping at the first group that is not, and at most
   ``max_fraction`` of K (rounded down to whole groups).

Refusals (node unchanged): no leading outlier group; a weight that is not a 2-D float32
constant; K not a multiple of ``group_size``; ``Ko`` would be all of K; node in ``exclude``.

Postcondition: ``graph.metadata["outlier_split"]`` maps each split node name to
``{"outlier_node", "outlier_rows", "rows"}``; :func:`outlier_layer_bits` turns it into the
``layer_bits`` of :class:`passes.quantize_weights.QuantizeWeightsPass`.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from qcompile.errors import InputError
from qcompile.ir import Graph, Node, TensorType

from .base import Pass, PassResult
from .reorder_channels import channel_magnitude

__all__ = ["SplitOutlierGroupsPass", "outlier_rows", "outlier_layer_bits"]

logger = logging.getLogger(__name__)

DEFAULT_RATIO = 4.0
DEFAULT_MAX_FRACTION = 0.25


class SplitOutlierGroupsPass(Pass):
    """Split each Linear's leading outlier groups (calibrated) into their own Linear."""

    name = "SplitOutlierGroupsPass"

    def __init__(self, calibration: dict | Sequence[dict], group_size: int, *, ratio: float = DEFAULT_RATIO,
                 max_fraction: float = DEFAULT_MAX_FRACTION, exclude: Sequence[str] = ()):
        feeds = [calibration] if isinstance(calibration, dict) else list(calibration)
        if not feeds:
            raise InputError("--outlier-bits needs at least one calibration feed dict")
        if not group_size:
            raise InputError("--outlier-bits needs --group-size > 0 (outlier groups are whole weight groups)")
        self.feeds, self.group_size = feeds, group_size
        self.ratio, self.max_fraction, self.exclude = ratio, max_fraction, set(exclude)

    def call(self, graph: Graph) -> PassResult:
        linears = [n for n in graph.nodes if n.op == "Linear" and n.name not in self.exclude and _splittable(
            graph, n, self.group_size)]
        mags = _magnitudes(graph, linears, self.feeds)
        g = graph.copy()
        split: dict[str, dict] = {}
        nodes: list[Node] = []
        for node in g.nodes:
            rows = outlier_rows(mags[node.inputs[0]], self.group_size, self.ratio, self.max_fraction) \
                if node.name in {n.name for n in linears} else 0
            if rows == 0:
                nodes.append(node)
                continue
            nodes += _split(g, node, rows)
            split[node.name] = {"outlier_node": f"{node.name}.outliers", "outlier_rows": rows,
                                "rows": g.type_of(node.inputs[1]).shape[0]}
        if not split:
            return PassResult(graph, False)
        g.nodes = nodes
        g.remove_unused()
        g.metadata["outlier_split"] = split
        logger.info("SplitOutlierGroupsPass: %d Linear(s) split", len(split))
        return PassResult(g, True)


def outlier_rows(magnitude: np.ndarray, group_size: int, ratio: float, max_fraction: float) -> int:
    """Rows in the leading groups whose channel max is >= ratio * median (whole groups, capped)."""
    k = magnitude.shape[0]
    median = float(np.median(magnitude))
    limit = int(k * max_fraction) // group_size
    count = 0
    for g in range(min(limit, k // group_size - 1)):
        if float(magnitude[g * group_size:(g + 1) * group_size].max()) < ratio * median:
            break
        count += 1
    return count * group_size


def outlier_layer_bits(graph: Graph, outlier_bits: int) -> dict[str, int]:
    """``layer_bits`` giving every outlier piece of ``graph.metadata["outlier_split"]`` its width."""
    return {v["outlier_node"]: outlier_bits for v in graph.metadata.get("outlier_split", {}).values()}


# ---------------------------------------------------------------------------- helpers
def _splittable(g: Graph, node: Node, group_size: int) -> bool:
    w = node.inputs[1]
    t = g.type_of(w)
    return g.is_constant(w) and len(t.shape) == 2 and t.dtype == "float32" and t.shape[0] % group_size == 0


def _magnitudes(graph: Graph, linears: list[Node], feeds: list[dict]) -> dict[str, np.ndarray]:
    from qcompile.interpreter import run

    wanted = {n.inputs[0] for n in linears}
    mags: dict[str, np.ndarray] = {}
    for feed in feeds if wanted else ():
        env = run(graph, feed, keep_all=True)
        for x in wanted:
            a = env[x]
            m = channel_magnitude(np.where(np.abs(a) > 1e30, 0, a), (a.ndim - 1,))
            mags[x] = np.maximum(mags.get(x, m), m)
        del env
    return mags


def _split(g: Graph, node: Node, rows: int) -> list[Node]:
    x, w = node.inputs[0], node.inputs[1]
    xt, (k, n) = g.type_of(x), g.type_of(w).shape
    axis = len(xt.shape) - 1
    out_t = g.type_of(node.outputs[0])
    names = {}
    for part, (lo, hi) in (("outliers", (0, rows)), ("rest", (rows, k))):
        names[f"x_{part}"] = g.add_value(g.fresh_name(f"{x}.{part}"), TensorType(xt.shape[:-1] + (hi - lo,), xt.dtype))
        names[f"w_{part}"] = g.add_constant(g.fresh_name(f"{w}.{part}"), g.constants[w][lo:hi])
        names[f"y_{part}"] = g.add_value(g.fresh_name(f"{node.outputs[0]}.{part}"), out_t)
    bias = node.inputs[2:3] if len(node.inputs) > 2 and node.inputs[2] else []
    slice_attrs = lambda lo, hi: {"starts": (lo,), "ends": (hi,), "axes": (axis,), "steps": (1,)}  # noqa: E731
    return [
        Node("Slice", g.fresh_name(f"{node.name}.slice_outliers"), [x], [names["x_outliers"]], slice_attrs(0, rows)),
        Node("Slice", g.fresh_name(f"{node.name}.slice_rest"), [x], [names["x_rest"]], slice_attrs(rows, k)),
        Node("Linear", f"{node.name}.outliers", [names["x_outliers"], names["w_outliers"]], [names["y_outliers"]],
             dict(node.attrs)),
        Node("Linear", node.name, [names["x_rest"], names["w_rest"], *bias], [names["y_rest"]], dict(node.attrs)),
        Node("Add", g.fresh_name(f"{node.name}.add_outliers"), [names["y_outliers"], names["y_rest"]],
             list(node.outputs)),
    ]
