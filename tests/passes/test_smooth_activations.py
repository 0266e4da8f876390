"""SmoothActivationsPass: function-preserving, per-channel factors as documented, and it makes the
per-tensor activation ranges of smoothed Linear inputs flatter."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.interpreter import run
from qcompile.ir import Graph, Node, TensorType
from qcompile.passes.calibrate import collect_statistics
from qcompile.passes.smooth_activations import SmoothActivationsPass, smoothing_factors


def _mlp(rng) -> Graph:
    g = Graph("mlp", ["x"], ["y"], [], {}, {}, {})
    g.add_value("x", TensorType((8, 16), "float32"))
    for name, shape in (("h", (8, 32)), ("r", (8, 32)), ("y", (8, 32))):
        g.add_value(name, TensorType(shape, "float32"))
    g.add_constant("w1", rng.normal(size=(16, 32)).astype(np.float32))
    g.add_constant("w2", rng.normal(size=(32, 32)).astype(np.float32))
    g.nodes += [Node("Linear", "fc1", ["x", "w1"], ["h"]), Node("Relu", "act", ["h"], ["r"]),
                Node("Linear", "fc2", ["r", "w2"], ["y"])]
    return g


def test_smoothing_preserves_the_function_and_flattens_channel_ranges():
    rng = np.random.default_rng(0)
    g = _mlp(rng)
    feeds = [{"x": (rng.normal(size=(8, 16)) * np.linspace(0.1, 20, 16)).astype(np.float32)} for _ in range(3)]
    stats = collect_statistics(g, feeds)
    smoothed = SmoothActivationsPass(stats, 0.5)(g).graph
    assert [n.op for n in smoothed.nodes] == ["Linear", "Relu", "Mul", "Linear"]  # graph inputs are skipped
    assert smoothed.metadata["smooth"]["values"][0]["linears"] == ["fc2"]
    for f in feeds:
        np.testing.assert_allclose(run(smoothed, f)["y"], run(g, f)["y"], rtol=1e-4, atol=1e-4)
    env = run(smoothed, feeds[0], keep_all=True)
    before = np.abs(env["r"]).max(axis=0)
    after = np.abs(env[smoothed.nodes[2].outputs[0]]).max(axis=0)
    spread = lambda v: v[v > 0].max() / v[v > 0].min()  # noqa: E731
    assert spread(after) < spread(before)


def test_an_unset_alpha_takes_the_path_default():
    from qcompile.passes.smooth_activations import DEFAULT_ALPHA, smooth_for_static

    rng = np.random.default_rng(1)
    g = _mlp(rng)
    feeds = [{"x": rng.normal(size=(8, 16)).astype(np.float32)}]
    for path in ("static", "integer_only"):
        assert smooth_for_static(g, feeds, None, path).metadata["smooth"]["alpha"] == DEFAULT_ALPHA[path]
    assert smooth_for_static(g, feeds, 0.0, "integer_only") is g


def test_factors_follow_the_formula_and_are_clamped():
    s = smoothing_factors(np.array([4.0, 1.0, 0.0]), np.array([1.0, 4.0, 1.0]), 0.5)
    np.testing.assert_allclose(s[:2], [2.0, 0.5])
    assert s[2] >= 1e-4
    with pytest.raises(ValueError):
        SmoothActivationsPass(None, 1.5)
