"""QuantizeActivationsPass: Before/Expected structure, refusals, numerics vs the interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.errors import InputError
from qcompile.interpreter import run
from qcompile.ir import Graph, Node, TensorType, Value, verify
from qcompile.passes.quantize_activations import (ActQuantConfig, QuantizeActivationsPass, collect_act_ranges,
                                                  quantize_weight_per_channel)


def _graph(seed=0, shared=True) -> Graph:
    """x -> Linear(w1) -> Relu -> Linear(w2); plus a second Linear on x (shares the quantizer)."""
    rng = np.random.default_rng(seed)
    g = Graph("t", ["x"], ["y", "z"], [], {}, {})
    g.add_value("x", TensorType((4, 32), "float32"))
    g.add_constant("w1", rng.standard_normal((32, 48)).astype(np.float32))
    g.add_constant("b1", rng.standard_normal(48).astype(np.float32))
    g.add_constant("w2", rng.standard_normal((48, 16)).astype(np.float32))
    g.add_constant("w3", rng.standard_normal((32, 16)).astype(np.float32))
    for name, shape in [("h", (4, 48)), ("r", (4, 48)), ("y", (4, 16)), ("z", (4, 16))]:
        g.add_value(name, TensorType(shape, "float32"))
    g.nodes = [Node("Linear", "fc1", ["x", "w1", "b1"], ["h"]), Node("Relu", "relu", ["h"], ["r"]),
               Node("Linear", "fc2", ["r", "w2"], ["y"]), Node("Linear", "fc3", ["x" if shared else "r", "w3"], ["z"])]
    if not shared:
        g.values["z"] = Value("z", TensorType((4, 16), "float32"))
    verify(g)
    return g


def test_structure_dynamic():
    g = _graph()
    out = QuantizeActivationsPass()(g)
    assert out.modified and out.graph is not g
    ops = [(n.op, n.name) for n in out.graph.nodes]
    assert ops == [("QuantizeAct", "fc1.quantize_act"), ("Int8Linear", "fc1"), ("Relu", "relu"),
                   ("QuantizeAct", "fc2.quantize_act"), ("Int8Linear", "fc2"), ("Int8Linear", "fc3")]
    fc1 = out.graph.nodes[1]
    assert fc1.inputs[:2] == ["x.act_u8", "x.act_scale"] and fc1.inputs[4] == "b1"
    assert out.graph.nodes[5].inputs[:2] == ["x.act_u8", "x.act_scale"]  # shared quantizer
    assert out.graph.constants[fc1.inputs[2]].dtype == np.int8
    assert out.graph.type_of("x.act_scale") == TensorType((4, 1), "float32")
    assert "w1" not in out.graph.constants  # float weights dropped
    assert [e["node"] for e in out.graph.metadata["quant_recipe"]] == ["fc1", "fc2", "fc3"]
    assert [n.op for n in g.nodes] == ["Linear", "Relu", "Linear", "Linear"]  # input untouched


def test_nothing_to_do_and_refusals():
    g = _graph()
    g2 = Graph("e", ["x"], ["x2"], [Node("Relu", "r", ["x"], ["x2"])],
               {"x": Value("x", TensorType((2, 3), "float32")), "x2": Value("x2", TensorType((2, 3), "float32"))}, {})
    assert not QuantizeActivationsPass()(g2).modified
    out = QuantizeActivationsPass(ActQuantConfig(exclude=("fc2",), min_linear_size=32 * 20))(g).graph
    assert [n.op for n in out.nodes if n.name in ("fc2", "fc3")] == ["Linear", "Linear"]
    static = QuantizeActivationsPass(ActQuantConfig(mode="static", ranges={"x": 3.0}))(g).graph
    assert {n.name for n in static.nodes if n.op == "Int8Linear"} == {"fc1", "fc3"}  # r has no range


def test_config_validation():
    with pytest.raises(InputError):
        ActQuantConfig(weight_bits=3)
    with pytest.raises(InputError):
        ActQuantConfig(mode="per-channel")
    with pytest.raises(InputError):
        QuantizeActivationsPass(ActQuantConfig(mode="static", ranges={"x": float("nan")}))(_graph())


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.2)])
def test_numerics_close_to_float(bits, tol):
    g = _graph()
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    ref = run(g, {"x": x})
    got = run(QuantizeActivationsPass(ActQuantConfig(weight_bits=bits))(g).graph, {"x": x})
    for name in ("y", "z"):
        err = np.linalg.norm(got[name] - ref[name]) / np.linalg.norm(ref[name])
        assert err < tol, (name, err)


def test_weight_quantization_per_channel():
    w = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32)
    q, s = quantize_weight_per_channel(w, 8, False)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    np.testing.assert_array_equal(np.abs(q).max(axis=0), 127)
    q4, s4 = quantize_weight_per_channel(w, 4, True)
    assert np.abs(q4).max() <= 7
    plain_q, plain_s = quantize_weight_per_channel(w, 4, False)
    assert np.square(q4 * s4 - w).sum() <= np.square(plain_q * plain_s - w).sum() + 1e-6


def test_collect_ranges_ignores_sentinels():
    g = Graph("m", ["x"], ["y"], [Node("Linear", "fc", ["x", "w"], ["y"])],
              {"x": Value("x", TensorType((2, 4), "float32")), "y": Value("y", TensorType((2, 2), "float32"))}, {})
    g.add_constant("w", np.ones((4, 2), np.float32))
    x = np.array([[1, -2, -3.4e38, 0.5], [np.inf, 1.5, -1, 0]], np.float32)
    ranges = collect_act_ranges(g, [{"x": x}], percentile=100)
    assert ranges == {"x": 2.0}
