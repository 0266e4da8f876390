"""Calibration: run the reference interpreter on sample inputs and record activation statistics.

:func:`collect_statistics` runs :func:`qcompile.interpreter.run` on each feed dict of a
calibration set and records, for every activation that feeds a ``Linear`` (one record per
value, shared by the Linears reading it, e.g. the Q/K/V projections):

* ``absmax[K]`` and ``mean_abs[K]``: per input channel (last axis), over the kept rows;
* ``hessian[K, K]`` (float64): ``sum_rows x^T x`` over the kept rows, the Hessian of the
  layer's squared output error (up to a factor 2) that GPTQ and the mixed-precision
  sensitivity use; ``rows`` is the number of rows summed.

Real models carry values that must not be averaged in (the reason onnxruntime's static
quantizer collapses on MiniLM):

1. **Sentinels.** An entry with ``|x| > SENTINEL`` (1e30) or a non-finite entry is a mask
   fill (MiniLM's attention mask is ``-3.4e38`` where a token is padding), not data. Every
   float value of the graph that holds such entries is recorded in ``Stats.masks`` (value
   name -> fraction of sentinel entries). For a Linear input, a row that holds a sentinel is
   dropped from all its statistics (counted in ``dropped_rows``).
2. **Padding rows.** With ``token_mask="auto"``, an integer graph input whose name contains
   ``mask``, whose values are all 0/1 and whose shape equals the leading axes of a Linear's
   input (``[B, S]`` for ``[B, S, K]``) selects the rows that count: rows where it is 0 are
   padding and are left out (``masked_rows``). Pass ``token_mask=None`` to keep every row,
   or the name of a graph input to choose it explicitly.

Invariants: the graph is never modified; statistics only ever see finite values below the
sentinel threshold; the result does not depend on how the calibration set is batched
except through float rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from qcompile.errors import InputError
from qcompile.interpreter import run
from qcompile.ir import Graph

from .base import Pass, PassResult

__all__ = ["SENTINEL", "InputStats", "Stats", "collect_statistics", "split_batches", "load_npz", "CalibrationPass",
           "row_selection", "token_mask_input"]

logger = logging.getLogger(__name__)

SENTINEL = 1e30


@dataclass(eq=False)
class InputStats:
    """Statistics of one activation value ``[..., K]`` that feeds one or more Linears."""

    value: str
    absmax: np.ndarray
    mean_abs: np.ndarray
    hessian: np.ndarray
    rows: int = 0
    dropped_rows: int = 0
    masked_rows: int = 0

    @classmethod
    def empty(cls, value: str, k: int) -> "InputStats":
        return cls(value, np.zeros(k, np.float32), np.zeros(k, np.float32), np.zeros((k, k), np.float64))

    def add(self, rows: np.ndarray) -> None:
        """Accumulate a [T, K] block of clean rows."""
        if not len(rows):
            return
        x = rows.astype(np.float64)
        total = self.mean_abs.astype(np.float64) * self.rows + np.abs(x).sum(axis=0)
        self.rows += len(rows)
        self.mean_abs = (total / self.rows).astype(np.float32)
        self.absmax = np.maximum(self.absmax, np.abs(rows).max(axis=0).astype(np.float32))
        self.hessian += x.T @ x

    def mean_hessian(self) -> np.ndarray:
        """``hessian / rows`` (the per-row second moment E[x x^T])."""
        return self.hessian / max(self.rows, 1)


@dataclass(eq=False)
class Stats:
    """Calibration result. ``linear_input`` maps Linear node names to keys of ``inputs``."""

    inputs: dict[str, InputStats] = field(default_factory=dict)
    linear_input: dict[str, str] = field(default_factory=dict)
    masks: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    token_mask: str | None = None

    def for_linear(self, node: str) -> InputStats | None:
        value = self.linear_input.get(node)
        return self.inputs.get(value) if value is not None else None

    def summary(self) -> dict:
        """Small JSON-able digest (no arrays) for reports."""
        return {
            "samples": self.samples,
            "token_mask": self.token_mask,
            "linear_inputs": len(self.inputs),
            "rows": {k: v.rows for k, v in self.inputs.items()},
            "dropped_rows": sum(v.dropped_rows for v in self.inputs.values()),
            "masked_rows": sum(v.masked_rows for v in self.inputs.values()),
            "masks": dict(self.masks),
        }


def collect_statistics(graph: Graph, feeds_list: Iterable[dict], token_mask: str | None = "auto") -> Stats:
    """Run ``graph`` on every feed dict of ``feeds_list`` and return the :class:`Stats`."""
    linear_input = {n.name: n.inputs[0] for n in graph.nodes if n.op == "Linear"}
    stats = Stats(linear_input=linear_input)
    for value in dict.fromkeys(linear_input.values()):
        stats.inputs[value] = InputStats.empty(value, graph.type_of(value).shape[-1])
    sentinel_counts: dict[str, list[int]] = {}
    for feeds in feeds_list:
        env = run(graph, feeds, keep_all=True)
        mask_name = token_mask_input(graph, env, token_mask)
        stats.token_mask = stats.token_mask or mask_name
        _count_sentinels(graph, env, sentinel_counts)
        for value, record in stats.inputs.items():
            _accumulate(record, env[value], env.get(mask_name) if mask_name else None)
        stats.samples += 1
    if stats.samples == 0:
        raise InputError("calibration needs at least one input sample")
    stats.masks = {k: round(c[0] / c[1], 6) for k, c in sentinel_counts.items()}
    logger.info("calibration: %d sample(s), %d Linear input(s), %d masked value(s), token mask %s",
                stats.samples, len(stats.inputs), len(stats.masks), stats.token_mask)
    return stats


def split_batches(graph: Graph, arrays: dict) -> list[dict]:
    """Cut calibration arrays into feed dicts of the graph's static input shapes.

    Each array's leading axis may be a multiple of the graph input's leading axis (e.g. 32
    sentences for a batch-1 graph); the other axes must match exactly.
    """
    missing = [n for n in graph.inputs if n not in arrays]
    if missing:
        raise InputError(f"calibration inputs lack {', '.join(missing)} (model inputs: {', '.join(graph.inputs)})")
    counts = set()
    for name in graph.inputs:
        want, got = graph.type_of(name), np.asarray(arrays[name])
        if got.ndim != len(want.shape) or got.shape[1:] != want.shape[1:] or not want.shape or \
                want.shape[0] == 0 or got.shape[0] % want.shape[0]:
            raise InputError(f"calibration input '{name}' has shape {list(got.shape)}; the model takes "
                             f"{list(want.shape)} (the leading axis may be a multiple)")
        counts.add(got.shape[0] // want.shape[0])
    if len(counts) != 1:
        raise InputError("calibration inputs have different numbers of samples")
    n, out = counts.pop(), []
    for i in range(n):
        feed = {}
        for name in graph.inputs:
            t, b = graph.type_of(name), graph.type_of(name).shape[0]
            feed[name] = np.ascontiguousarray(np.asarray(arrays[name])[i * b:(i + 1) * b], dtype=t.dtype)
        out.append(feed)
    return out


def load_npz(path) -> dict[str, np.ndarray]:
    """Calibration arrays from an npz file (``--calib``), one array per model input."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read calibration inputs ({err})") from None


class CalibrationPass(Pass):
    """Analysis pass: collects :class:`Stats` into ``self.stats``; never modifies the graph."""

    name = "CalibrationPass"

    def __init__(self, feeds_list: Sequence[dict], token_mask: str | None = "auto"):
        self.feeds_list = list(feeds_list)
        self.token_mask = token_mask
        self.stats: Stats | None = None

    def call(self, graph: Graph) -> PassResult:
        self.stats = collect_statistics(graph, self.feeds_list, self.token_mask)
        return PassResult(graph, False)


# ---------------------------------------------------------------------------- helpers
def _is_sentinel(x: np.ndarray) -> np.ndarray:
    return ~np.isfinite(x) | (np.abs(x) > SENTINEL)


def _count_sentinels(graph: Graph, env: dict, counts: dict[str, list[int]]) -> None:
    for name, array in env.items():
        if name in graph.constants or not isinstance(array, np.ndarray) or array.dtype.kind != "f":
            continue
        bad = int(np.count_nonzero(_is_sentinel(array)))
        if bad:
            c = counts.setdefault(name, [0, 0])
            c[0] += bad
            c[1] += array.size


def token_mask_input(graph: Graph, env: dict, choice: str | None) -> str | None:
    if choice is None:
        return None
    if choice != "auto":
        if choice not in graph.inputs:
            raise InputError(f"token mask '{choice}' is not a model input ({', '.join(graph.inputs)})")
        return choice
    for name in graph.inputs:
        x = env[name]
        if "mask" in name.lower() and x.dtype.kind in "iub" and x.ndim == 2 and np.isin(x, (0, 1)).all():
            return name
    return None


def row_selection(x: np.ndarray, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows [T, K], unmasked [T], clean [T])`` of activation ``x``: rows left by the token
    mask (``mask`` of shape ``x.shape[:-1]``, or None) and, of those, rows free of sentinels."""
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    keep = np.ones(len(rows), dtype=bool)
    if mask is not None and x.ndim >= 2 and x.shape[:-1] == mask.shape:
        keep = mask.reshape(-1) != 0
    return rows, keep, keep & ~_is_sentinel(rows).any(axis=1)


def _accumulate(record: InputStats, x: np.ndarray, mask) -> None:
    rows, keep, clean = row_selection(x, mask)
    record.masked_rows += int(np.count_nonzero(~keep))
    record.dropped_rows += int(np.count_nonzero(keep & ~clean))
    record.add(rows[clean])
