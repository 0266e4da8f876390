"""QuantizeWeightsPass + WeightQuantConfig: structure, QuantSpec, recipe, numerics, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.errors import InputError
from qcompile.interpreter import run
from qcompile.ir import Graph, Node, QuantSpec, TensorType, verify
from qcompile.passes import QuantizeWeightsPass, WeightQuantConfig
from qcompile.passes.rtn import quantize_and_pack
from qcompile.quant import dequantize_weight

M, K, H, N = 4, 128, 64, 32
V, D = 1024, 64  # 65536 elements: quantized; the 16-row table stays float


def _model(shared_weight=False) -> Graph:
    """x -> Linear(w1, b1) -> Relu -> Linear(w2) -> y ; ids -> Gather(big) / Gather(small)."""
    rng = np.random.default_rng(0)
    g = Graph("t", ["x", "ids"], ["y", "e", "p"], [], {}, {})
    g.add_value("x", TensorType((M, K), "float32"))
    g.add_value("ids", TensorType((M, 3), "int64"))
    g.add_constant("w1", rng.standard_normal((K, H)).astype(np.float32) * 0.1)
    g.add_constant("b1", rng.standard_normal(H).astype(np.float32))
    g.add_constant("w2", rng.standard_normal((H, N)).astype(np.float32) * 0.1)
    g.add_constant("big", rng.standard_normal((V, D)).astype(np.float32))
    g.add_constant("small", rng.standard_normal((16, D)).astype(np.float32))
    for name, shape in [("h", (M, H)), ("r", (M, H)), ("y", (M, N)), ("e", (M, 3, D)), ("p", (M, 3, D))]:
        g.add_value(name, TensorType(shape, "float32"))
    g.nodes = [
        Node("Linear", "fc1", ["x", "w1", "b1"], ["h"]),
        Node("Relu", "relu", ["h"], ["r"]),
        Node("Linear", "fc2", ["r", "w2"], ["y"]),
        Node("Gather", "emb", ["big", "ids"], ["e"], {"axis": 0}),
        Node("Gather", "pos", ["small", "ids"], ["p"], {"axis": 0}),
    ]
    if shared_weight:  # fc3 reuses w2 on another H-wide input
        g.add_value("y2", TensorType((M, N), "float32"))
        g.outputs.append("y2")
        g.nodes.append(Node("Linear", "fc3", ["h", "w2"], ["y2"]))
    verify(g)
    return g


def _feeds():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((M, K)).astype(np.float32),
            "ids": rng.integers(-V, V, size=(M, 3)).astype(np.int64) % 16}


def _structure(graph: Graph) -> list[tuple]:
    return [(n.op, n.name, tuple(n.inputs), tuple(n.outputs)) for n in graph.nodes]


def test_before_expected_structure_and_quant_specs():
    before = _model()
    result = QuantizeWeightsPass(WeightQuantConfig(bits=4, group_size=32))(before)
    g = result.graph
    assert result.modified
    assert _structure(g) == [
        ("QLinear", "fc1", ("x", "w1.qweight", "w1.scales", "w1.zeros", "b1"), ("h",)),
        ("Relu", "relu", ("h",), ("r",)),
        ("QLinear", "fc2", ("r", "w2.qweight", "w2.scales", "w2.zeros", ""), ("y",)),
        ("QGather", "emb", ("big.qweight", "big.scales", "big.zeros", "ids"), ("e",)),
        ("Gather", "pos", ("small", "ids"), ("p",)),
    ]
    assert g.nodes[0].attrs == {"bits": 4, "group_size": 32, "symmetric": False}
    assert g.nodes[3].attrs == {"bits": 8, "group_size": 0, "symmetric": False}
    assert g.values["w1.qweight"].quant == QuantSpec(4, False, 0, 32, (K, H), method="rtn")
    assert g.values["big.qweight"].quant == QuantSpec(8, False, 1, 0, (V, D), method="rtn")
    assert g.constants["w1.qweight"].shape == (H, K // 2) and g.constants["w1.scales"].shape == (H, K // 32)
    assert g.constants["big.qweight"].shape == (V, D) and g.constants["big.scales"].shape == (V, 1)
    assert not {"w1", "w2", "big"} & set(g.constants) and "small" in g.constants
    assert [n.op for n in before.nodes] == ["Linear", "Relu", "Linear", "Gather", "Gather"]  # input untouched
    assert "w1" in before.constants and "quant_recipe" not in before.metadata


def test_symmetric_has_no_zeros():
    g = QuantizeWeightsPass(WeightQuantConfig(bits=4, symmetric=True, embedding_symmetric=True))(_model()).graph
    fc1, emb = g.nodes[0], g.nodes[3]
    assert fc1.inputs[3] == "" and emb.inputs[2] == ""
    assert not any(name.endswith(".zeros") for name in g.constants)
    assert g.values[fc1.inputs[1]].quant.symmetric


def test_recipe_lists_layers_in_node_order():
    g = QuantizeWeightsPass(WeightQuantConfig(bits=4, group_size=32))(_model()).graph
    recipe = g.metadata["quant_recipe"]
    assert [(r["node"], r["op"], r["shape"]) for r in recipe] == [
        ("fc1", "QLinear", [K, H]), ("fc2", "QLinear", [H, N]), ("emb", "QGather", [V, D])]
    fc1 = recipe[0]
    assert fc1["bits"] == 4 and fc1["group_size"] == 32 and fc1["method"] == "rtn" and not fc1["symmetric"]
    assert fc1["weight_bytes_fp32"] == K * H * 4
    assert fc1["weight_bytes_packed"] == K * H // 2 + 2 * (H * K // 32) * 4
    assert 0 < fc1["rel_error"] < 0.15 and 0 < recipe[2]["rel_error"] < 0.01
    assert g.metadata["weight_quant_config"]["bits"] == 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 32, 128])
def test_interpreter_matches_dequantized_numpy(bits, symmetric, group_size):
    before = _model()
    if group_size == 128:  # fc2 has K=64: keep it float, quantize fc1 only
        config = WeightQuantConfig(bits=bits, group_size=128, symmetric=symmetric, exclude=("fc2",))
    else:
        config = WeightQuantConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    g = QuantizeWeightsPass(config)(before).graph
    feeds = _feeds()
    got = run(g, feeds, keep_all=True)
    c = before.constants
    w1q = quantize_and_pack(c["w1"], bits, group_size, symmetric).dequantize()
    h = feeds["x"] @ w1q + c["b1"]
    np.testing.assert_allclose(got["h"], h, rtol=1e-4, atol=1e-4)
    table = quantize_and_pack(c["big"].T, 8, 0, False).dequantize().T
    np.testing.assert_array_equal(got["e"], table[feeds["ids"]])
    np.testing.assert_array_equal(got["p"], c["small"][feeds["ids"]])
    # fake-quant output is close to the float model (looser for fewer bits)
    ref = run(before, feeds)
    rel = np.linalg.norm(got["y"] - ref["y"]) / np.linalg.norm(ref["y"])
    assert rel < {2: 0.6, 3: 0.3, 4: 0.15, 8: 0.01}[bits]


def test_qlinear_constants_decode_with_quant_module():
    g = QuantizeWeightsPass(WeightQuantConfig(bits=3, group_size=32, clip_search=False))(_model()).graph
    spec = g.values["w1.qweight"].quant
    w = dequantize_weight(g.constants["w1.qweight"], g.constants["w1.scales"], g.constants["w1.zeros"],
                          spec.bits, spec.group_size, spec.logical_shape[0])
    step = np.repeat(g.constants["w1.scales"], 32, axis=1).T
    assert np.all(np.abs(w - _model().constants["w1"]) <= step / 2 * (1 + 1e-5))


def test_shared_weight_is_quantized_once():
    g = QuantizeWeightsPass(WeightQuantConfig(bits=4))(_model(shared_weight=True)).graph
    fc2, fc3 = g.nodes[2], g.nodes[5]
    assert fc3.op == "QLinear" and fc3.inputs[1:4] == fc2.inputs[1:4]
    assert sum(name.endswith(".qweight") for name in g.constants) == 3


@pytest.mark.parametrize("config", [
    WeightQuantConfig(exclude=("fc1", "fc2"), embedding_bits=None),
    WeightQuantConfig(min_linear_size=K * H + 1, embedding_bits=None),
    WeightQuantConfig(exclude=("fc1", "fc2", "emb")),
    WeightQuantConfig(exclude=("fc1", "fc2"), min_embedding_size=V * D + 1),
])
def test_nothing_to_quantize_is_unmodified(config):
    before = _model()
    result = QuantizeWeightsPass(config)(before)
    assert not result.modified and result.graph is before


def test_exclude_and_min_size_keep_some_layers_float():
    g = QuantizeWeightsPass(WeightQuantConfig(min_linear_size=K * H, exclude=("emb",)))(_model()).graph
    assert [n.op for n in g.nodes] == ["QLinear", "Relu", "Linear", "Gather", "Gather"]
    assert [r["node"] for r in g.metadata["quant_recipe"]] == ["fc1"]


def test_group_size_not_dividing_k_names_the_node():
    with pytest.raises(InputError, match="'fc2'.*K=64.*group_size 128"):
        QuantizeWeightsPass(WeightQuantConfig(group_size=128))(_model())


@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 5}, r"--bits must be one of 2, 3, 4, 8 \(got 5\)"),
    ({"bits": 16}, r"--bits must be one of 2, 3, 4, 8 \(got 16\)"),
    ({"embedding_bits": 6}, r"--embedding-bits must be one of 2, 3, 4, 8 \(got 6\)"),
    ({"group_size": 12}, r"--group-size must be 0 \(per channel\) or a positive multiple of 8 \(got 12\)"),
    ({"group_size": -8}, r"--group-size"),
    ({"min_linear_size": -1}, r"min_linear_size"),
    ({"exclude": "fc1"}, r"exclude must be a tuple"),
    ({"version": 2}, r"version 2"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        WeightQuantConfig(**kwargs)


def test_config_is_frozen_and_serializable():
    config = WeightQuantConfig(bits=8, group_size=64, exclude=["a"])
    assert config.exclude == ("a",)
    assert config.to_json()["exclude"] == ["a"] and config.to_json()["version"] == 1
    with pytest.raises(AttributeError):
        config.bits = 4
