"""QuantizeActivationsPass: W8A8 / W4A8 / W4A4 -- Linear layers become integer GEMMs.

Rewrites (functional: works on ``graph.copy()``; node names and output values are kept):

1. For every distinct activation ``x`` that feeds a rewritten Linear, one
   ``QuantizeAct(x) -> (x.act_u8 uint8, x.act_scale float32[..., 1])`` is inserted right
   before the first such Linear (the Q/K/V projections of a transformer share one).
   ``mode="dynamic"``: per row (token) absmax scales; ``mode="static"``: one scale per tensor,
   ``absmax / qmax`` from ``config.ranges`` (see :func:`collect_act_ranges`). ``qmax`` is 127,
   or 7 with ``config.act_bits`` 4 (attr ``bits=4``: 4-bit codes, held in the same uint8
   layout so the int8 GEMMs run them unchanged).
2. ``Linear(x, W[K, N], b?)`` -> ``Int8Linear(x.act_u8, x.act_scale, W.q int8[K, N],
   W.wscale float32[N], b | "")`` with attr ``wbits``: weights symmetric per output channel,
   ``wscale = clip_ratio * max_k |W[k, n]| / qmax`` with ``qmax = 2**(wbits-1) - 1``
   (``clip_ratio`` from a small MSE search when ``config.clip_search``), codes
   ``clip(rne(W / wscale), -qmax, qmax)``.

Refusals (left float): nodes in ``config.exclude``; weights that are not 2-D float32
constants; K*N below ``config.min_linear_size``; static mode without a range for ``x``.

Errors: static mode whose range is not finite and positive raises InputError naming the value.

Postcondition: every Int8Linear's weight is an int8 constant in ``[-qmax, qmax]``.
``graph.metadata["quant_recipe"]`` gains one entry per rewritten node;
``graph.metadata["act_quant"]`` records the config.

:func:`collect_act_ranges` (calibration for static mode) runs the reference interpreter and
takes, per activation, a percentile of ``|x|`` over all calibration samples, ignoring
sentinel entries (``|x| > 1e30`` or non-finite: MiniLM's ``-3.4e38`` attention-mask fill) so
that neither masks nor a few outlier entries set the range.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from qcompile.errors import InputError, InvariantError
from qcompile.interpreter_int8 import act_qmax
from qcompile.ir import Graph, Node, TensorType

from .base import Pass, PassResult

__all__ = ["ActQuantConfig", "QuantizeActivationsPass", "collect_act_ranges", "quantize_weight_per_channel",
           "SENTINEL"]

logger = logging.getLogger(__name__)

SENTINEL = 1e30
MODES = ("dynamic", "static")
_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@dataclass(frozen=True)
class ActQuantConfig:
    """How to quantize Linear activations and weights (validated on construction).

    ``ranges``: value name -> calibrated absmax (static mode), e.g. from
    :func:`collect_act_ranges`. ``clip_search`` defaults on for weights below 8 bits.
    """

    weight_bits: int = 8
    act_bits: int = 8
    mode: str = "dynamic"
    ranges: dict = field(default_factory=dict)
    clip_search: bool | None = None
    min_linear_size: int = 0
    exclude: tuple = ()
    version: int = 1

    def __post_init__(self):
        if self.weight_bits not in (4, 8):
            raise InputError(f"--bits with --act-bits {self.act_bits} must be 4 or 8 (got {self.weight_bits})")
        if self.act_bits not in (4, 8):
            raise InputError(f"--act-bits must be 4 or 8 for integer GEMMs (got {self.act_bits})")
        if self.mode not in MODES:
            raise InputError(f"--act-mode must be one of {', '.join(MODES)} (got '{self.mode}')")

    @property
    def search(self) -> bool:
        return self.weight_bits < 8 if self.clip_search is None else self.clip_search

    def to_json(self) -> dict:
        data = asdict(self)
        data["ranges"] = len(self.ranges)
        data["exclude"] = list(self.exclude)
        return data


def quantize_weight_per_channel(w: np.ndarray, bits: int, clip_search: bool) -> tuple[np.ndarray, np.ndarray]:
    """float32 W[K, N] -> (int8 codes [K, N], float32 scales [N]), symmetric per column."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    amax = np.maximum(np.abs(w).max(axis=0), np.float32(1e-12)).astype(np.float32)
    best_scale, best_err = amax / qmax, None
    for ratio in _CLIP_RATIOS if clip_search else (1.0,):
        scale = (amax * np.float32(ratio) / qmax).astype(np.float32)
        q = np.clip(np.rint(w / scale), -qmax, qmax)
        err = np.square(q * scale - w).sum(axis=0)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = np.where(better, scale, best_scale), np.where(better, err, best_err)
    q = np.clip(np.rint(w / best_scale), -qmax, qmax).astype(np.int8)
    return q, best_scale.astype(np.float32)


class QuantizeActivationsPass(Pass):
    """Linear -> QuantizeAct + Int8Linear, by :class:`ActQuantConfig` (see module docstring)."""

    name = "QuantizeActivationsPass"

    def __init__(self, config: ActQuantConfig | None = None):
        self.config = config or ActQuantConfig()

    def call(self, graph: Graph) -> PassResult:
        g = graph.copy()
        quantized: dict[str, tuple[str, str]] = {}
        weights: dict[str, tuple[str, str, float]] = {}
        recipe: list[dict] = []
        nodes: list[Node] = []
        for node in g.nodes:
            if not self._eligible(g, node):
                nodes.append(node)
                continue
            x = node.inputs[0]
            if x not in quantized:
                qnode, quantized[x] = self._quantize_node(g, node, x)
                nodes.append(qnode)
            wq = self._weight(g, node.inputs[1], weights)
            u, s = quantized[x]
            bias = node.inputs[2] if len(node.inputs) > 2 else ""
            nodes.append(Node("Int8Linear", node.name, [u, s, wq[0], wq[1], bias], list(node.outputs),
                              {"wbits": self.config.weight_bits}))
            recipe.append(self._entry(g, node, wq[2]))
        if not recipe:
            return PassResult(graph, False)
        g.nodes = nodes
        g.remove_unused()
        g.metadata["quant_recipe"] = list(g.metadata.get("quant_recipe", [])) + recipe
        g.metadata["act_quant"] = self.config.to_json()
        logger.info("QuantizeActivationsPass: %d Linear(s) -> Int8Linear (%s)", len(recipe), self.config.mode)
        return PassResult(g, True)

    def ensures(self, graph: Graph) -> None:
        qmax = 2 ** (self.config.weight_bits - 1) - 1
        for node in graph.nodes:
            if node.op == "Int8Linear":
                w = graph.constants.get(node.inputs[2])
                if w is None or w.dtype != np.int8 or np.abs(w.astype(np.int16)).max(initial=0) > qmax:
                    raise InvariantError(f"node '{node.name}' (Int8Linear): weight is not int8 in +-{qmax}")

    # -- helpers ---------------------------------------------------------------------
    def _eligible(self, g: Graph, node: Node) -> bool:
        if node.op != "Linear" or node.name in self.config.exclude:
            return False
        w = node.inputs[1]
        wt = g.type_of(w)
        if not g.is_constant(w) or len(wt.shape) != 2 or wt.dtype != "float32":
            return False
        if g.type_of(node.inputs[0]).dtype != "float32" or wt.size < self.config.min_linear_size:
            return False
        return self.config.mode == "dynamic" or node.inputs[0] in self.config.ranges

    def _quantize_node(self, g: Graph, node: Node, x: str) -> tuple[Node, tuple[str, str]]:
        xt = g.type_of(x)
        u = g.add_value(g.fresh_name(f"{x}.act_u8"), TensorType(xt.shape, "uint8"))
        s = g.add_value(g.fresh_name(f"{x}.act_scale"), TensorType(xt.shape[:-1] + (1,), "float32"))
        attrs = {"mode": self.config.mode}
        if self.config.act_bits != 8:
            attrs["bits"] = self.config.act_bits
        if self.config.mode == "static":
            amax = float(self.config.ranges[x])
            if not np.isfinite(amax) or amax <= 0:
                raise InputError(f"static activation range of '{x}' (input of node '{node.name}') is {amax}")
            attrs["scale"] = float(np.float32(amax) / act_qmax(self.config.act_bits))
        name = g.fresh_name(f"{node.name}.quantize_act")
        return Node("QuantizeAct", name, [x], [u, s], attrs), (u, s)

    def _weight(self, g: Graph, w: str, cache: dict) -> tuple[str, str, float]:
        if w not in cache:
            array = g.constants[w]
            q, scale = quantize_weight_per_channel(array, self.config.weight_bits, self.config.search)
            err = float(np.linalg.norm(q * scale - array) / max(np.linalg.norm(array), 1e-30))
            cache[w] = (g.add_constant(g.fresh_name(f"{w}.q"), q),
                        g.add_constant(g.fresh_name(f"{w}.wscale"), scale), err)
        return cache[w]

    def _entry(self, g: Graph, node: Node, err: float) -> dict:
        k, n = g.type_of(node.inputs[1]).shape
        return {"node": node.name, "op": "Int8Linear", "shape": [int(k), int(n)],
                "bits": self.config.weight_bits, "group_size": 0, "symmetric": True, "method": "rtn",
                "act_bits": self.config.act_bits, "act_mode": self.config.mode, "clip_search": self.config.search,
                "weight_bytes_fp32": int(k * n * 4), "weight_bytes_packed": int(k * n + 4 * n),
                "rel_error": round(err, 6)}


def collect_act_ranges(graph: Graph, feeds_list: Iterable[dict], percentile: float = 99.99,
                       values: Iterable[str] | None = None) -> dict[str, float]:
    """Per activation (default: every float input of a Linear), the ``percentile`` of ``|x|``.

    Entries with ``|x| > SENTINEL`` or non-finite are ignored (mask fills, not data).
    """
    from qcompile.interpreter import run

    wanted = set(values) if values is not None else {
        n.inputs[0] for n in graph.nodes if n.op == "Linear" and graph.type_of(n.inputs[0]).dtype == "float32"}
    samples: dict[str, list[np.ndarray]] = {v: [] for v in wanted}
    for feeds in feeds_list:
        env = run(graph, feeds, keep_all=True)
        for v in wanted:
            a = np.abs(env[v].astype(np.float32).ravel())
            samples[v].append(a[np.isfinite(a) & (a <= SENTINEL)])
    ranges = {}
    for v, parts in samples.items():
        data = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if data.size:
            ranges[v] = float(np.percentile(data, percentile))
    return ranges


def quantize_w8a8(graph: Graph, config, calibration: dict | None = None) -> Graph:
    """The driver's ``act_bits=8`` path: Linears -> Int8Linear, then embeddings by weight-only RTN.

    ``config`` is a :class:`qcompile.config.CompileConfig`. Static mode calibrates on
    ``config.calib`` (npz), else ``calibration`` (eval inputs; a leading axis that is a
    multiple of the model's batch is split into samples), else synthesized inputs.
    """
    from qcompile.pipeline import synthesize_inputs

    from .quant_config import WeightQuantConfig
    from .quantize_weights import QuantizeWeightsPass

    ranges = {}
    if config.act_mode == "static":
        from . import calibrate
        from .smooth_activations import smooth_for_static

        arrays = calibrate.load_npz(config.calib) if config.calib else calibration
        feeds = calibrate.split_batches(graph, arrays) if arrays is not None else [synthesize_inputs(graph)]
        graph = smooth_for_static(graph, feeds, getattr(config, "smooth", 0.0))
        ranges = collect_act_ranges(graph, feeds)
    act = ActQuantConfig(weight_bits=int(config.bits), act_bits=int(config.act_bits), mode=config.act_mode,
                         ranges=ranges)
    g = QuantizeActivationsPass(act)(graph).graph
    recipe = list(g.metadata.get("quant_recipe", []))
    wq = WeightQuantConfig(bits=int(config.bits), group_size=config.group_size, symmetric=config.symmetric,
                           embedding_bits=config.embedding_bits)
    g = QuantizeWeightsPass(wq)(g).graph  # embeddings, and Linears left float (refused above)
    g.metadata["quant_recipe"] = recipe + [e for e in g.metadata.get("quant_recipe", []) if e not in recipe]
    return g
