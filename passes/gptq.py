"""GPTQ weight quantization (Frantar et al., 2023) from calibration Hessians.

For a Linear ``y = x @ W`` with W[K, N] and calibration Hessian ``H = sum x^T x`` [K, K],
GPTQ quantizes the K input rows of W one at a time and spreads each row's rounding error
over the rows not yet quantized, in proportion to the inverse Hessian, so that the layer's
output error ``tr(dW^T H dW)`` (not the weight error) is small.

Algorithm (as the reference implementation): dampen ``H += percdamp * mean(diag H) * I``
(default :data:`PERCDAMP` 10%, where the reference uses 1%: with a few thousand calibration
tokens, as a sentence encoder's calibration set gives, 1% fits the calibration Hessian too
closely and generalizes worse); rows with ``H[k, k] == 0`` (dead inputs) get
``H[k, k] = 1`` and weight 0;
optionally order rows by decreasing ``diag H`` (``act_order``); take the upper Cholesky
factor U of ``H^-1``; process rows in blocks of ``block_size`` (128), updating the rest of
the block eagerly and the rows after it lazily with one matrix product per block.

Quantization grid: that of :mod:`passes.rtn` (scales/zeros per group of ``group_size`` rows
of K, per output channel), so the result packs into the same QLinear format:

1. without act-order, each group's scale/zero is fitted (with :func:`passes.rtn.quantize_rtn`,
   optionally with its clip search) to the group's *error-updated* rows when GPTQ reaches
   the group's first row; blocks are a multiple of the group size so a group never
   straddles two blocks;
2. with act-order, groups are *static*: fitted to the original W before any update, then
   each row uses the parameters of the group it belongs to in the original order, so the
   packed layout (groups of consecutive K) stays valid.

With ``pin_extremes`` (below) codes stay in [1, 2**bits - 1] as RTN's symmetric ones (the
most negative code unused); otherwise an error-updated row may also take code 0.

Refit (asymmetric grids with a float zero point, i.e. below
:data:`passes.rtn.INTEGER_ZERO_MIN_BITS`): once the codes are chosen, each group's scale and
zero are refit by least squares to the layer objective (:func:`refit_groups`); the layer
error never increases (MiniLM W2 g128 held-out cosine 0.869 -> 0.873).

:class:`GPTQQuantizer` plugs into :class:`passes.quantize_weights.QuantizeWeightsPass`
(:class:`GPTQPass`), which writes QLinear nodes with ``method="gptq"`` in the QuantSpec and
recipe. Linears without calibration statistics fall back to RTN.
:class:`GPTQRoundWeightsPass` serves the W8A8 / W4A8 paths, whose own quantizer packs the
weights: it leaves GPTQ's reconstruction on that quantizer's grid in the float graph, and
:func:`label_rounded` then marks those nodes' recipe entries ``method="gptq"``.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg

from qcompile.errors import InputError
from qcompile.ir import Graph
from qcompile.quant import pack_codes

from .base import Pass, PassResult
from .calibrate import Stats
from .quant_config import WeightQuantConfig
from .quantize_weights import QuantizeWeightsPass
from .rtn import PackedWeight, integer_zero, quantize_rtn

__all__ = ["gptq_quantize", "refit_groups", "GPTQQuantizer", "GPTQPass", "GPTQRoundWeightsPass", "label_rounded",
           "hessian_error"]

logger = logging.getLogger(__name__)

BLOCK_SIZE = 128
PERCDAMP = 0.1  # 10%: measured on MiniLM held out (tools/accuracy_sweep.py); 1% overfits small sets
REFIT_DAMP = 0.01  # dampening of the Hessian in refit_groups (2G parameters per column overfit little)


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int, symmetric: bool,
                  clip_search: bool = False, *, act_order: bool = False, percdamp: float | None = None,
                  block_size: int = BLOCK_SIZE, pin_extremes: bool = False, name: str = "weight",
                  factors: dict | None = None) -> PackedWeight:
    """GPTQ of W[K, N] given H[K, K]; returns the packed weight in the QLinear layout.

    ``pin_extremes`` (symmetric, per channel only): each column's largest |W| entry takes the
    extreme code +-(2**(bits-1) - 1), so that the column's largest |Wq| is exactly qmax * scale
    and an absmax re-quantization of Wq (the W8A8 / W4A8 quantizer) reproduces it exactly.
    ``factors``: a dict in which the Cholesky factor of ``H^-1`` is kept per (name, act_order,
    percdamp), for quantizing the same layer at several widths (mixed precision).
    """
    percdamp = PERCDAMP if percdamp is None else percdamp
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape if w.ndim == 2 else (0, 0)
    if w.ndim != 2 or np.shape(hessian) != (k, k):
        raise InputError(f"layer '{name}': Hessian {np.shape(hessian)} does not match weight {list(np.shape(w))}")
    gs = group_size or k
    quantize_rtn(w, bits, group_size, symmetric, False, name=name, ratios=(1.0,))  # validates w, bits, groups
    h = np.array(hessian, dtype=np.float64)
    wt = w.T.astype(np.float64)  # [N, K]: rows are output channels, columns the K inputs
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    static = act_order or gs >= k
    scales, zeros = _static_params(wt.T, bits, group_size, symmetric, clip_search, name) if static else (None, None)
    key = (name, act_order, percdamp)
    u = factors.get(key) if factors is not None else None
    if u is None:
        u = _inverse_cholesky(h[np.ix_(perm, perm)], percdamp, name)
        if factors is not None:
            factors[key] = u
    wt = np.ascontiguousarray(wt[:, perm], dtype=np.float32)
    block = gs * max(1, round(block_size / gs)) if gs < k else block_size
    codes = np.zeros((n, k), dtype=np.uint8)
    pins = _pins(w, bits, symmetric, gs == k, name) if pin_extremes else None
    lowest = 1 if pins is not None else 0  # pinned: the most negative code stays unused, as in RTN
    group_params = _Groups(scales, zeros, n, k // gs, symmetric, bits)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hinv1 = wt[:, i1:i2].copy(), u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            col = perm[i1 + i]
            if not static and col % gs == 0:
                group_params.fit(col // gs, w1[:, i:i + gs].T, group_size, clip_search, name)
            s, z = group_params.at(col // gs)
            q = np.clip(np.rint(w1[:, i] / s + z), lowest, (1 << bits) - 1)
            if pins is not None:
                q = np.where(pins[0] == col, pins[1], q)
            codes[:, col] = q.astype(np.uint8)
            err = (w1[:, i] - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= np.outer(err, hinv1[i, i:])
            err1[:, i] = err
        wt[:, i2:] -= err1 @ u[i1:i2, i2:]
    sc, zr = group_params.arrays()
    if zr is not None and not integer_zero(bits) and pins is None:
        sc, zr = refit_groups(w, h, codes, gs, sc, zr)
    return PackedWeight(pack_codes(codes, bits), sc, zr, bits, group_size, (k, n))


def refit_groups(w: np.ndarray, hessian: np.ndarray, codes: np.ndarray, group_size: int, scales: np.ndarray,
                 zeros: np.ndarray, damp: float = REFIT_DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (scale, zero) per group and column for fixed ``codes``[N, K] (float zeros).

    With the codes fixed, ``Wq[k, n] = s[n, g] * q[k, n] + t[n, g]`` (``t = -s * z``) is linear
    in the 2G parameters of column n, so the ones minimizing ``(w - wq)^T H (w - wq)`` (H
    dampened by ``damp * mean(diag H)``) solve a 2G x 2G system per column. A column keeps its
    old parameters unless the solution has positive scales and a lower error.
    """
    k, n = w.shape
    groups = k // group_size
    h = hessian + np.eye(k) * (damp * float(np.mean(np.diag(hessian))))
    q = codes.T.astype(np.float64)  # [K, N]
    w64 = w.astype(np.float64)
    blocks = [slice(g * group_size, (g + 1) * group_size) for g in range(groups)]
    hq = [h[:, b] @ q[b] for b in blocks]  # H restricted to group g's rows, applied to its codes
    h1 = [h[:, b].sum(axis=1) for b in blocks]  # ... applied to its ones
    hw = h @ w64
    m = np.zeros((n, 2 * groups, 2 * groups))
    rhs = np.zeros((n, 2 * groups))
    for g, b in enumerate(blocks):
        for g2 in range(groups):
            m[:, g, g2] = np.einsum("kn,kn->n", q[b], hq[g2][b])
            m[:, g, groups + g2] = q[b].T @ h1[g2][b]
            m[:, groups + g, groups + g2] = h1[g2][b].sum()
        rhs[:, g] = np.einsum("kn,kn->n", q[b], hw[b])
        rhs[:, groups + g] = hw[b].sum(axis=0)
    m[:, groups:, :groups] = np.transpose(m[:, :groups, groups:], (0, 2, 1))
    m += np.eye(2 * groups)[None] * (1e-9 * np.trace(m, axis1=1, axis2=2) / (2 * groups))[:, None, None]
    p = np.linalg.solve(m, rhs[..., None])[..., 0]
    new_s, new_t = p[:, :groups], p[:, groups:]
    of_k = np.arange(k) // group_size
    old = (q - zeros.T[of_k]) * scales.T[of_k]
    new = q * new_s.T[of_k] + new_t.T[of_k]
    better = (_column_error(w64, new, h) < _column_error(w64, old, h)) & np.all(new_s > 0, axis=1)
    safe_s = np.where(new_s > 0, new_s, 1.0)
    out_s = np.where(better[:, None], new_s, scales).astype(np.float32)
    out_z = np.where(better[:, None], -new_t / safe_s, zeros).astype(np.float32)
    return out_s, out_z


def _column_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> np.ndarray:
    d = w - wq
    return np.einsum("kn,kn->n", d, h @ d)


def hessian_error(w: np.ndarray, wq: np.ndarray, hessian: np.ndarray) -> float:
    """``tr((W - Wq)^T H (W - Wq))``: the layer's summed squared output error on calibration data."""
    d = np.asarray(w, np.float64) - np.asarray(wq, np.float64)
    return float(np.einsum("kn,kn->", d, np.asarray(hessian, np.float64) @ d))


class GPTQQuantizer:
    """:class:`passes.quantize_weights.LinearQuantizer` backed by calibration :class:`Stats`."""

    method = "gptq"

    def __init__(self, stats: Stats, *, act_order: bool = False, percdamp: float | None = None,
                 block_size: int = BLOCK_SIZE):
        self.stats = stats
        self.act_order = act_order
        self.percdamp = percdamp
        self.block_size = block_size
        self.factors: dict = {}  # Cholesky factors of H^-1 per layer, shared by its widths

    def quantize(self, node, w, bits, group_size, symmetric, clip_search):
        record = self.stats.for_linear(node)
        if record is None or record.rows == 0 or record.hessian.shape[0] != np.shape(w)[0]:
            logger.warning("GPTQ: no calibration statistics for '%s'; using RTN", node)
            return None
        return gptq_quantize(w, record.mean_hessian(), bits, group_size, symmetric, clip_search,
                             act_order=self.act_order, percdamp=self.percdamp, block_size=self.block_size,
                             name=node, factors=self.factors)


class GPTQPass(QuantizeWeightsPass):
    """QuantizeWeightsPass with GPTQ for Linears (embeddings stay RTN); recipe method "gptq"."""

    name = "GPTQPass"

    def __init__(self, config: WeightQuantConfig | None, stats: Stats, *, act_order: bool = False,
                 layer_bits=None, percdamp: float | None = None):
        super().__init__(config, layer_bits=layer_bits,
                         quantizer=GPTQQuantizer(stats, act_order=act_order, percdamp=percdamp))


class GPTQRoundWeightsPass(Pass):
    """Linear weights -> their GPTQ reconstruction on the W8A8 / W4A8 weight grid (graph stays float).

    For the activation-quantizing paths (``--act-bits 8``), whose quantizer
    (:func:`passes.quantize_activations.quantize_weight_per_channel`) takes symmetric
    per-output-channel absmax scales: each calibrated Linear's W is replaced by
    ``(q - z) * s`` from :func:`gptq_quantize` (symmetric, per channel, clip-searched
    scales, ``pin_extremes``), so that quantizer reproduces GPTQ's codes exactly. Linears
    without statistics keep their weights. Records ``graph.metadata["gptq_rounded"]`` (names).
    """

    name = "GPTQRoundWeightsPass"

    def __init__(self, stats: Stats, bits: int, *, act_order: bool = False, percdamp: float | None = None):
        self.stats, self.bits, self.act_order, self.percdamp = stats, bits, act_order, percdamp

    def call(self, graph: Graph) -> PassResult:
        g = graph.copy()
        done = []
        for node in g.nodes:
            record = self.stats.for_linear(node.name) if node.op == "Linear" else None
            w = node.inputs[1] if record is not None else None
            if w is None or not g.is_constant(w) or record.rows == 0 or g.constants[w].ndim != 2:
                continue
            pw = gptq_quantize(g.constants[w], record.mean_hessian(), self.bits, 0, True, True,
                               act_order=self.act_order, percdamp=self.percdamp, pin_extremes=True, name=node.name)
            node.inputs[1] = g.add_constant(g.fresh_name(f"{w}.gptq"), pw.dequantize())
            done.append(node.name)
        if not done:
            return PassResult(graph, False)
        g.remove_unused()
        g.metadata["gptq_rounded"] = done
        return PassResult(g, True)


def label_rounded(graph: Graph) -> Graph:
    """Set ``method="gptq"`` in the recipe entries of the nodes :class:`GPTQRoundWeightsPass` rounded."""
    rounded = set(graph.metadata.get("gptq_rounded", ()))
    for entry in graph.metadata.get("quant_recipe", []):
        if entry.get("node") in rounded:
            entry["method"] = "gptq"
    return graph


# ---------------------------------------------------------------------------- helpers
def _inverse_cholesky(h: np.ndarray, percdamp: float, name: str) -> np.ndarray:
    """Upper Cholesky factor of (H + damp*I)^-1, float32."""
    h = h + np.eye(len(h)) * (percdamp * float(np.mean(np.diag(h))))
    for attempt in range(4):
        try:
            lower = scipy.linalg.cholesky(h, lower=True)
            hinv = scipy.linalg.cho_solve((lower, True), np.eye(len(h)))
            return scipy.linalg.cholesky(hinv, lower=False).astype(np.float32)
        except np.linalg.LinAlgError:
            h = h + np.eye(len(h)) * (10.0 ** attempt * percdamp * float(np.mean(np.diag(h))))
    raise InputError(f"layer '{name}': calibration Hessian is not positive definite even after dampening")


def _pins(w: np.ndarray, bits: int, symmetric: bool, per_channel: bool, name: str):
    """(row of each column's largest |W|, its extreme code) for ``pin_extremes``."""
    if not (symmetric and per_channel):
        raise InputError(f"layer '{name}': pinning extreme codes needs a symmetric per-channel grid")
    rows = np.argmax(np.abs(w), axis=0)
    top = w[rows, np.arange(w.shape[1])]
    rows = np.where(top == 0, -1, rows)  # an all-zero column has nothing to pin
    mid = 1 << (bits - 1)
    return rows, np.where(top < 0, 1, 2 * mid - 1).astype(np.float64)


def _static_params(w: np.ndarray, bits, group_size, symmetric, clip_search, name):
    _, scales, zeros = quantize_rtn(w, bits, group_size, symmetric, clip_search, name=name)
    return scales, zeros


class _Groups:
    """Per-group scale/zero columns [N] for symmetric or asymmetric grids."""

    def __init__(self, scales, zeros, n: int, groups: int, symmetric: bool, bits: int):
        self.scales = np.ones((n, groups), np.float32) if scales is None else scales
        self.zeros = zeros if zeros is not None or symmetric else np.zeros((n, groups), np.float32)
        self.symmetric = symmetric
        self.mid = np.float32(1 << (bits - 1))
        self.bits = bits

    def fit(self, g: int, rows: np.ndarray, group_size: int, clip_search: bool, name: str) -> None:
        _, s, z = quantize_rtn(rows, self.bits, 0, self.symmetric, clip_search, name=name)
        self.scales[:, g] = s[:, 0]
        if not self.symmetric:
            self.zeros[:, g] = z[:, 0]

    def at(self, g: int):
        return self.scales[:, g], (self.mid if self.symmetric else self.zeros[:, g])

    def arrays(self):
        return self.scales, (None if self.symmetric else self.zeros)
