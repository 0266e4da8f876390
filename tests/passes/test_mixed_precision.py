"""passes.mixed_precision: milp optimality (brute force), budgets, the pass end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qcompile.errors import InputError
from qcompile.ir import Graph, Node, TensorType, verify
from qcompile.passes import WeightQuantConfig
from qcompile.passes.calibrate import collect_statistics
from qcompile.passes.mixed_precision import MixedPrecisionPass, choose_bits

BITS = (2, 3, 4, 8)


def _instance(seed, layers=5):
    rng = np.random.default_rng(seed)
    sens, cost = {}, {}
    for i in range(layers):
        base, size = rng.uniform(0.1, 10), int(rng.integers(1, 20))
        sens[f"l{i}"] = {b: base * 4.0 ** -b * rng.uniform(0.8, 1.2) for b in BITS}
        cost[f"l{i}"] = {b: float(size * b) for b in BITS}
    return sens, cost


def _brute(sens, cost, budget):
    names, best = list(sens), (np.inf, None)
    for combo in itertools.product(BITS, repeat=len(names)):
        if sum(cost[n][b] for n, b in zip(names, combo)) <= budget + 1e-9:
            total = sum(sens[n][b] for n, b in zip(names, combo))
            best = min(best, (total, combo), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("seed", range(6))
def test_milp_is_optimal_against_brute_force(seed):
    sens, cost = _instance(seed)
    low = sum(c[2] for c in cost.values())
    budget = low * (1.0 + 0.3 * (seed + 1))
    chosen = choose_bits(sens, cost, budget)
    used = sum(cost[n][b] for n, b in chosen.items())
    total = sum(sens[n][b] for n, b in chosen.items())
    best_total, _ = _brute(sens, cost, budget)
    assert used <= budget + 1e-9
    assert total == pytest.approx(best_total, rel=1e-6)


def test_infeasible_budget_names_the_minimum():
    sens, cost = _instance(0)
    with pytest.raises(InputError, match="smallest possible"):
        choose_bits(sens, cost, sum(c[2] for c in cost.values()) - 1)


K, H, N, T = 128, 256, 64, 256


def _mlp() -> Graph:
    rng = np.random.default_rng(4)
    g = Graph("mlp", ["x"], ["y"], [], {}, {})
    g.add_value("x", TensorType((T, K), "float32"))
    g.add_constant("w1", rng.standard_normal((K, H)).astype(np.float32) * 0.1)
    g.add_constant("w2", rng.standard_normal((H, H)).astype(np.float32) * 0.1)
    g.add_constant("w3", rng.standard_normal((H, N)).astype(np.float32) * 0.1)
    for name, shape in [("h", (T, H)), ("r", (T, H)), ("h2", (T, H)), ("y", (T, N))]:
        g.add_value(name, TensorType(shape, "float32"))
    g.nodes = [Node("Linear", "fc1", ["x", "w1"], ["h"]), Node("Relu", "relu", ["h"], ["r"]),
               Node("Linear", "fc2", ["r", "w2"], ["h2"]), Node("Linear", "fc3", ["h2", "w3"], ["y"])]
    verify(g)
    return g


def _stats(g):
    x = np.random.default_rng(5).standard_normal((T, K)).astype(np.float32)
    return collect_statistics(g, [{"x": x}])


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptaq"])
def test_pass_average_bits_budget(method):
    g = _mlp()
    cfg = WeightQuantConfig(bits=4, group_size=32)
    feeds = [{"x": np.random.default_rng(5).standard_normal((T, K)).astype(np.float32)}]
    q = MixedPrecisionPass(cfg, _stats(g), avg_bits=2.5, method=method, feeds=feeds)(g).graph
    mp = q.metadata["mixed_precision"]
    sizes = {"fc1": K * H, "fc2": H * H, "fc3": H * N}
    bits = {r["node"]: r["bits"] for r in q.metadata["quant_recipe"]}
    assert bits == {n: v["bits"] for n, v in mp["layers"].items()}
    assert sum(sizes[n] * bits[n] for n in sizes) <= 2.5 * sum(sizes.values())
    assert mp["average_bits"] <= 2.5 and len(set(bits.values())) > 1
    assert all(r["method"] == method for r in q.metadata["quant_recipe"])
    for node in (n for n in q.nodes if n.op == "QLinear"):
        assert node.attrs.get("bits") == bits[node.name] and q.values[node.inputs[1]].quant.bits == bits[node.name]


def test_pass_size_budget_is_respected():
    g = _mlp()
    cfg = WeightQuantConfig(bits=4, group_size=32)
    budget = 60_000
    q = MixedPrecisionPass(cfg, _stats(g), size_budget_bytes=budget)(g).graph
    assert q.weight_bytes() <= budget
    with pytest.raises(InputError, match="smallest possible"):
        MixedPrecisionPass(cfg, _stats(g), size_budget_bytes=1000)(g)
    with pytest.raises(InputError, match="exactly one"):
        MixedPrecisionPass(cfg, None)


@pytest.mark.slow
def test_minilm_mixed_precision_2_5_bits(minilm_onnx, minilm_feeds):
    """2.5-bit average (g128): reports the held-out mean embedding cosine; beats uniform 2-bit."""
    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.interpreter import run
    from qcompile.metrics import mean_cosine
    from qcompile.models import minilm
    from qcompile.passes import FoldLinearPass, QuantizeWeightsPass

    g = FoldLinearPass()(load_onnx(minilm_onnx, shapes={n: (16, 128) for n in minilm.INPUT_NAMES})).graph
    calib = {k: v[:16] for k, v in minilm_feeds.items()}
    held_out = {k: v[16:32] for k, v in minilm_feeds.items()}
    ref = run(g, held_out)["embedding"]
    stats = collect_statistics(g, [calib])
    cfg = WeightQuantConfig(bits=2, group_size=128)
    mixed = MixedPrecisionPass(cfg, stats, avg_bits=2.5)(g).graph
    assert mixed.metadata["mixed_precision"]["average_bits"] <= 2.5
    cos_mixed = mean_cosine(ref, run(mixed, held_out)["embedding"])
    cos_w2 = mean_cosine(ref, run(QuantizeWeightsPass(cfg)(g).graph, held_out)["embedding"])
    print(f"MiniLM g128 held-out cosine: uniform W2 {cos_w2:.4f}, mixed 2.5-bit average {cos_mixed:.4f}")
    assert cos_mixed > cos_w2


def test_output_measured_sensitivity_matches_a_direct_run():
    """With feeds, s[l, lowest] is the model-output squared error with only layer l quantized."""
    from qcompile.interpreter import run
    from qcompile.passes import QuantizeWeightsPass

    g = _mlp()
    feed = {"x": np.random.default_rng(6).standard_normal((T, K)).astype(np.float32)}
    cfg = WeightQuantConfig(bits=4, group_size=32)
    q = MixedPrecisionPass(cfg, _stats(g), avg_bits=3, feeds=[feed])(g).graph
    mp = q.metadata["mixed_precision"]
    assert mp["objective"] == "sum of measured model-output errors"
    ref = run(g, feed)["y"].astype(np.float64)
    for layer in ("fc1", "fc3"):
        only = WeightQuantConfig(bits=2, group_size=32, exclude=tuple({"fc1", "fc2", "fc3"} - {layer}))
        alone = QuantizeWeightsPass(only)(g).graph
        direct = float(np.sum((run(alone, feed)["y"] - ref) ** 2))
        assert mp["layers"][layer]["sensitivity"]["2"] == pytest.approx(direct, rel=1e-3)


def test_fixed_bits_layers_keep_their_width():
    g = _mlp()
    q = MixedPrecisionPass(WeightQuantConfig(bits=4, group_size=32), _stats(g), avg_bits=3,
                           fixed_bits={"fc1": 4})(g).graph
    layers = q.metadata["mixed_precision"]["layers"]
    assert layers["fc1"]["bits"] == 4 and list(layers["fc1"]["sensitivity"]) == ["4"]
    assert q.metadata["mixed_precision"]["average_bits"] <= 3
