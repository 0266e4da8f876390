"""FoldLinearPass: Before/Expected structure on tiny graphs, refusals, numeric equality."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.interpreter import run
from qcompile.ir import Graph, Node, TensorType, verify
from qcompile.passes import FoldLinearPass

M, K, N = 3, 8, 5


def _structure(graph: Graph) -> list[tuple]:
    return [(n.op, n.name, tuple(n.inputs), tuple(n.outputs)) for n in graph.nodes]


def _graph(nodes, consts: dict, values: dict, outputs=("out",), x_shape=(M, K)) -> Graph:
    g = Graph("t", ["x"], list(outputs), [], {}, {})
    g.add_value("x", TensorType(x_shape, "float32"))
    for name, array in consts.items():
        g.add_constant(name, array)
    for name, shape in values.items():
        g.add_value(name, TensorType(shape, "float32"))
    g.nodes = [Node(*n) for n in nodes]
    verify(g)
    return g


def _consts(bias_shape=(N,), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((K, N)).astype(np.float32),
        "b": rng.standard_normal(bias_shape).astype(np.float32),
    }


def _check_numeric(before: Graph, after: Graph, x_shape=(M, K)):
    feeds = {"x": np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)}
    want, got = run(before, feeds), run(after, feeds)
    for name in before.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["y_first", "bias_first"])
@pytest.mark.parametrize("bias_shape", [(N,), (1, N), (1, 1, N)])
def test_matmul_add_folds_to_linear_with_bias(order, bias_shape):
    x_shape = (2, M, K) if len(bias_shape) == 3 else (M, K)
    lead = x_shape[:-1]
    add_inputs = ["y", "b"] if order == "y_first" else ["b", "y"]
    before = _graph(
        [("MatMul", "mm", ["x", "w"], ["y"]), ("Add", "add", add_inputs, ["out"])],
        _consts(bias_shape), {"y": lead + (N,), "out": lead + (N,)}, x_shape=x_shape,
    )
    result = FoldLinearPass()(before)
    assert result.modified
    bias = "b" if bias_shape == (N,) else "b_vec"
    assert _structure(result.graph) == [("Linear", "mm", ("x", "w", bias), ("out",))]
    assert "y" not in result.graph.values
    assert result.graph.constants[bias].shape == (N,)
    assert set(result.graph.constants) == {"w", bias}
    assert _structure(before)[0][0] == "MatMul"  # input graph untouched
    _check_numeric(before, result.graph, x_shape)


def test_matmul_without_bias_becomes_linear():
    before = _graph([("MatMul", "mm", ["x", "w"], ["y"]), ("Relu", "r", ["y"], ["out"])],
                    _consts(), {"y": (M, N), "out": (M, N)})
    result = FoldLinearPass()(before)
    assert _structure(result.graph) == [("Linear", "mm", ("x", "w"), ("y",)), ("Relu", "r", ("y",), ("out",))]
    _check_numeric(before, result.graph)


def test_matmul_with_other_users_keeps_add():
    before = _graph(
        [("MatMul", "mm", ["x", "w"], ["y"]), ("Add", "add", ["y", "b"], ["z"]), ("Mul", "mul", ["y", "z"], ["out"])],
        _consts(), {"y": (M, N), "z": (M, N), "out": (M, N)},
    )
    result = FoldLinearPass()(before)
    assert [n.op for n in result.graph.nodes] == ["Linear", "Add", "Mul"]
    assert result.graph.nodes[0].inputs == ["x", "w"]
    _check_numeric(before, result.graph)


def test_linear_output_that_is_graph_output_keeps_add():
    before = _graph([("MatMul", "mm", ["x", "w"], ["y"]), ("Add", "add", ["y", "b"], ["out"])],
                    _consts(), {"y": (M, N), "out": (M, N)}, outputs=("y", "out"))
    result = FoldLinearPass()(before)
    assert [n.op for n in result.graph.nodes] == ["Linear", "Add"]


@pytest.mark.parametrize("bias_shape", [(M, N), (1,), (M, 1)])
def test_bias_not_per_column_is_refused(bias_shape):
    before = _graph([("MatMul", "mm", ["x", "w"], ["y"]), ("Add", "add", ["y", "b"], ["out"])],
                    _consts(bias_shape), {"y": (M, N), "out": (M, N)})
    result = FoldLinearPass()(before)
    assert [n.op for n in result.graph.nodes] == ["Linear", "Add"]
    _check_numeric(before, result.graph)


def test_add_of_two_activations_is_refused():
    before = _graph(
        [("MatMul", "mm", ["x", "w"], ["y"]), ("Relu", "r", ["x"], ["x2"]),
         ("MatMul", "mm2", ["x2", "w"], ["y2"]), ("Add", "add", ["y", "y2"], ["out"])],
        _consts(), {"y": (M, N), "x2": (M, K), "y2": (M, N), "out": (M, N)},
    )
    result = FoldLinearPass()(before)
    assert [n.op for n in result.graph.nodes] == ["Linear", "Relu", "Linear", "Add"]
    _check_numeric(before, result.graph)


def test_nothing_to_fold_is_unmodified():
    rng = np.random.default_rng(0)
    consts = {"w3": rng.standard_normal((2, K, N)).astype(np.float32)}
    before = _graph(
        [("Relu", "r", ["x"], ["x2"]), ("Transpose", "t", ["x2"], ["x2_t"], {"perm": (1, 0)}),
         ("MatMul", "mm", ["x2", "x2_t"], ["out"])],
        {}, {"x2": (M, K), "x2_t": (K, M), "out": (M, M)},
    )
    result = FoldLinearPass()(before)
    assert not result.modified and result.graph is before
    # a 3-D constant weight is not a Linear weight either
    g3 = _graph([("MatMul", "mm", ["x", "w3"], ["out"])], consts, {"out": (2, M, N)})
    result = FoldLinearPass()(g3)
    assert not result.modified
    assert _structure(result.graph) == [("MatMul", "mm", ("x", "w3"), ("out",))]


def _mlp_onnx(path):
    """MatMul+Add -> Relu -> MatMul+Add(bias first) as exporters write it (float32 throughout)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {"w1": (K, 16), "b1": (16,), "w2": (16, N), "b2": (1, N)}
    arrays = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in inits.items()]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1_matmul"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_add"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2_matmul"),
        helper.make_node("Add", ["b2", "h3"], ["y"], name="fc2_add"),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], arrays)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_mlp_from_onnx_frontend(tmp_path):
    """Both MatMul+Add pairs of an exported-style MLP fold; outputs are unchanged."""
    from qcompile.frontends.onnx_frontend import load_onnx

    graph = load_onnx(_mlp_onnx(tmp_path / "mlp.onnx"))
    result = FoldLinearPass()(graph)
    assert result.modified
    assert [(n.op, n.name, len(n.inputs)) for n in result.graph.nodes] == [
        ("Linear", "fc1_matmul", 3), ("Relu", "relu", 1), ("Linear", "fc2_matmul", 3)]
    feeds = {"x": np.random.default_rng(0).standard_normal((M, K)).astype(np.float32)}
    out = graph.outputs[0]
    np.testing.assert_allclose(run(result.graph, feeds)[out], run(graph, feeds)[out], rtol=1e-5, atol=1e-5)
