"""passes.calibrate: per-channel statistics, Hessians, sentinel masks and padding rows."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.errors import InputError
from qcompile.ir import Graph, Node, TensorType, verify
from qcompile.passes.calibrate import CalibrationPass, collect_statistics, split_batches

B, S, K, N = 2, 5, 8, 4


def _model() -> Graph:
    """x[B,S,K] -> Linear(w) -> y ; mask-fill: Where(m, 0, -3.4e38) -> sm (a sentinel value)."""
    rng = np.random.default_rng(0)
    g = Graph("cal", ["x", "attention_mask"], ["y", "fill"], [], {}, {})
    g.add_value("x", TensorType((B, S, K), "float32"))
    g.add_value("attention_mask", TensorType((B, S), "int64"))
    g.add_constant("w", rng.standard_normal((K, N)).astype(np.float32))
    g.add_constant("zero", np.zeros((), np.int64))
    g.add_constant("f0", np.zeros((), np.float32))
    g.add_constant("fmin", np.array(np.finfo(np.float32).min, np.float32))
    g.add_value("y", TensorType((B, S, N), "float32"))
    g.add_value("pad", TensorType((B, S), "bool"))
    g.add_value("fill", TensorType((B, S), "float32"))
    g.nodes = [
        Node("Linear", "fc", ["x", "w"], ["y"]),
        Node("Equal", "is_pad", ["attention_mask", "zero"], ["pad"]),
        Node("Where", "fill_mask", ["pad", "fmin", "f0"], ["fill"]),
    ]
    verify(g)
    return g


def _feeds(seed=1):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, S), np.int64)
    mask[0, 3:] = 0
    mask[1, 4:] = 0
    return {"x": rng.standard_normal((B, S, K)).astype(np.float32), "attention_mask": mask}


def test_hessian_absmax_mean_abs_over_real_tokens():
    feeds = [_feeds(1), _feeds(2)]
    stats = collect_statistics(_model(), feeds)
    rec = stats.for_linear("fc")
    rows = np.concatenate([f["x"][f["attention_mask"] != 0] for f in feeds]).astype(np.float64)
    assert rec.rows == len(rows) == 14 and rec.masked_rows == 6 and stats.token_mask == "attention_mask"
    np.testing.assert_allclose(rec.hessian, rows.T @ rows, rtol=1e-10)
    np.testing.assert_allclose(rec.mean_hessian(), rows.T @ rows / 14, rtol=1e-10)
    np.testing.assert_allclose(rec.absmax, np.abs(rows).max(0), rtol=1e-6)
    np.testing.assert_allclose(rec.mean_abs, np.abs(rows).mean(0), rtol=1e-6)
    assert rec.hessian.dtype == np.float64


def test_sentinel_values_are_recorded_as_masks_not_statistics():
    stats = collect_statistics(_model(), [_feeds()])
    assert stats.masks == {"fill": pytest.approx(3 / 10)}
    summary = stats.summary()
    assert summary["masks"] == stats.masks and summary["samples"] == 1


def test_rows_with_sentinels_are_dropped_and_no_mask_keeps_all_rows():
    feeds = _feeds()
    feeds["x"][1, 2, 3] = -3.4e38
    stats = collect_statistics(_model(), [feeds], token_mask=None)
    rec = stats.for_linear("fc")
    assert rec.rows == B * S - 1 and rec.dropped_rows == 1 and rec.masked_rows == 0
    assert np.isfinite(rec.hessian).all() and rec.absmax.max() < 1e30


def test_split_batches_and_errors():
    g = _model()
    big = {k: np.concatenate([v, v, v]) for k, v in _feeds().items()}
    parts = split_batches(g, big)
    assert len(parts) == 3 and parts[2]["x"].shape == (B, S, K)
    with pytest.raises(InputError, match="attention_mask"):
        split_batches(g, {"x": big["x"]})
    with pytest.raises(InputError, match="shape"):
        split_batches(g, {"x": big["x"][:, :2], "attention_mask": big["attention_mask"]})
    with pytest.raises(InputError, match="at least one"):
        collect_statistics(g, [])


def test_calibration_pass_does_not_modify():
    g = _model()
    p = CalibrationPass([_feeds()])
    result = p(g)
    assert result.graph is g and not result.modified and p.stats.for_linear("fc").rows == 7
