"""Profitability check (backends/profitability.py): estimates, decisions, float fallback."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from qcompile.interpreter import run
from qcompile.ir import Graph, Node, TensorType, verify
from qcompile.passes import QuantizeWeightsPass, WeightQuantConfig
from qcompile.backends import profitability as P

HOST = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})


def _model(m: int, layers: list[tuple[str, int, int]]) -> Graph:
    """x[m, k0] -> independent Linears (name, k, n) each reading its own input."""
    rng = np.random.default_rng(0)
    g = Graph("t", [], [], [], {}, {})
    for name, k, n in layers:
        g.add_value(f"{name}_x", TensorType((m, k), "float32"))
        g.inputs.append(f"{name}_x")
        g.add_constant(f"{name}_w", rng.standard_normal((k, n)).astype(np.float32) * 0.1)
        g.add_constant(f"{name}_b", rng.standard_normal(n).astype(np.float32))
        g.add_value(f"{name}_y", TensorType((m, n), "float32"))
        g.outputs.append(f"{name}_y")
        g.nodes.append(Node("Linear", name, [f"{name}_x", f"{name}_w", f"{name}_b"], [f"{name}_y"]))
    verify(g)
    return g


def test_estimates():
    # decode GEMV: packed 4-bit streams 1/8 of the fp32 bytes -> profitable
    est = P.estimate_linear(1, 4096, 4096, 4, 128, HOST)
    assert est.profitable and est.quant_s < est.float_s / 4
    assert "GEMV" in est.quant_kernel
    # few rows, n not a multiple of the vector width: scalar tiles + dequant -> unprofitable
    est = P.estimate_linear(8, 64, 3, 4, 32, HOST)
    assert not est.profitable
    assert "scalar tile" in est.quant_kernel and "us >" in est.reason
    # a large GEMM amortizes the dequantization
    assert P.estimate_linear(128, 384, 1536, 4, 32, HOST).profitable


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_apply_fallback(mode):
    float_graph = _model(8, [("good", 256, 512), ("odd", 64, 3)])
    quant = QuantizeWeightsPass(WeightQuantConfig(bits=4, group_size=32))(float_graph).graph
    assert [n.op for n in quant.nodes] == ["QLinear", "QLinear"]
    out, decisions = P.apply_fallback(quant, float_graph, HOST, mode)
    verify(out)
    by_node = {d["node"]: d for d in decisions}
    assert by_node["good"]["profitable"] and not by_node["odd"]["profitable"]
    recipe = {e["node"]: e for e in out.metadata["quant_recipe"]}
    assert recipe["good"]["est_quant_us"] > 0 and "fallback" not in recipe["good"]
    assert "unprofitable" in recipe["odd"]
    if mode == "off":
        assert [n.op for n in out.nodes] == ["QLinear", "QLinear"]
        assert "fallback" not in recipe["odd"]
    else:
        assert [n.op for n in out.nodes] == ["QLinear", "Linear"]
        assert recipe["odd"]["fallback"] == "float" and recipe["odd"]["reason"]
        assert out.nodes[1].inputs == float_graph.nodes[1].inputs
        rng = np.random.default_rng(2)
        feeds = {n: rng.standard_normal(float_graph.type_of(n).shape).astype(np.float32)
                 for n in float_graph.inputs}
        np.testing.assert_array_equal(run(out, feeds)["odd_y"], run(float_graph, feeds)["odd_y"])
    assert [n.op for n in quant.nodes] == ["QLinear", "QLinear"]  # input graph untouched


def test_bad_mode():
    g = _model(1, [("a", 64, 16)])
    with pytest.raises(ValueError, match="fallback mode"):
        P.apply_fallback(g, g, HOST, "always")
