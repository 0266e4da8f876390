"""IR -> ONNX export: every op runs in onnxruntime and matches the reference interpreter."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompile.interpreter import run
from qcompile.ir import Graph, Node, QuantSpec, TensorType, verify
from qcompile.onnx_export import CUSTOM_DOMAIN, to_onnx
from qcompile.ops import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY
from qcompile.quant import pack_codes

RNG = np.random.default_rng(0)
F32 = "float32"


def _rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _one_node(op, inputs: dict, out_shape, attrs=None, out_dtype=F32, quant=None):
    """Graph with one node; ``inputs`` maps name -> ("in"|"const", array); "" names stay absent."""
    g = Graph(f"t_{op}", [], ["y"], [], {}, {})
    feeds = {}
    for name, (kind, array) in inputs.items():
        if kind == "const":
            g.add_constant(name, array, (quant or {}).get(name))
        elif kind == "in":
            g.add_value(name, TensorType(array.shape, str(array.dtype)))
            g.inputs.append(name)
            feeds[name] = array
    g.add_value("y", TensorType(tuple(out_shape), out_dtype))
    g.nodes.append(Node(op, f"{op}_0", [n if k != "absent" else "" for n, (k, _) in inputs.items()], ["y"], attrs or {}))
    verify(g)
    return g, feeds


X = _rand(2, 3, 4)
IMG = _rand(1, 2, 6, 6)
POS = np.abs(X) + 0.5
W4 = np.abs(RNG.integers(0, 16, (8, 64))).astype(np.uint8)  # codes [N=8, K=64]
QSPEC = QuantSpec(4, False, 0, 32, (64, 8))
QATTRS = {"bits": 4, "group_size": 32, "symmetric": False}
QARGS = {"qw": ("const", pack_codes(W4, 4)), "s": ("const", np.abs(_rand(8, 2)) * 0.1), "z": ("const", np.full((8, 2), 8, np.float32))}

CASES = {
    **{op: ({"a": ("in", POS), "b": ("const", np.abs(_rand(4)) + 0.5)}, X.shape, {},
            "bool" if op in "Equal Less Greater LessOrEqual GreaterOrEqual".split() else F32)
       for op in ELEMENTWISE_BINARY - {"And", "Or"}},
    **{op: ({"a": ("in", X > 0), "b": ("const", np.array([True, False, True, False]))}, X.shape, {}, "bool")
       for op in ("And", "Or")},
    **{op: ({"a": ("in", POS if op in ("Sqrt", "Log") else X)}, X.shape, {}, "bool" if op == "IsNaN" else F32)
       for op in ELEMENTWISE_UNARY - {"Not"}},
    "Not": ({"a": ("in", X > 0)}, X.shape, {}, "bool"),
    "Where": ({"c": ("in", X > 0), "a": ("in", X), "b": ("const", _rand(4))}, X.shape, {}, F32),
    "Clip": ({"a": ("in", X)}, X.shape, {"min": -0.3, "max": None}, F32),
    "Gelu": ({"a": ("in", X)}, X.shape, {"approximate": "none"}, F32),
    "Gelu_tanh": ({"a": ("in", X)}, X.shape, {"approximate": "tanh"}, F32),
    "Cast": ({"a": ("in", X * 5)}, X.shape, {"to": "int32"}, "int32"),
    "Softmax": ({"a": ("in", X)}, X.shape, {"axis": 1}, F32),
    "LayerNorm": ({"a": ("in", X), "g": ("const", _rand(4)), "b": ("const", _rand(4))}, X.shape,
                  {"axis": 2, "epsilon": 1e-5}, F32),
    "ReduceSum": ({"a": ("in", X)}, (2, 4), {"axes": (1,), "keepdims": False}, F32),
    "ReduceMean": ({"a": ("in", X)}, (2, 3, 1), {"axes": (2,), "keepdims": True}, F32),
    "ReduceL2": ({"a": ("in", X)}, (1, 1, 1), {"axes": (0, 1, 2), "keepdims": True}, F32),
    "MatMul": ({"a": ("in", X), "w": ("const", _rand(4, 5))}, (2, 3, 5), {}, F32),
    "Linear": ({"a": ("in", X), "w": ("const", _rand(4, 5)), "b": ("const", _rand(5))}, (2, 3, 5), {}, F32),
    "QLinear": ({"a": ("in", _rand(3, 64)), **QARGS, "bias": ("absent", None)}, (3, 8), QATTRS, F32),
    "QGather": ({**QARGS, "ids": ("in", np.array([[0, 7, 3]]))}, (1, 3, 64), QATTRS, F32),
    "Reshape": ({"a": ("in", X)}, (6, 4), {"shape": (6, 4)}, F32),
    "Transpose": ({"a": ("in", X)}, (4, 2, 3), {"perm": (2, 0, 1)}, F32),
    "Gather": ({"a": ("in", X), "i": ("const", np.array([-1, 0]))}, (2, 2, 4), {"axis": 1}, F32),
    "Slice": ({"a": ("in", X)}, (2, 3, 2), {"starts": (3,), "ends": (-1,), "axes": (2,), "steps": (-2,)}, F32),
    "Concat": ({"a": ("in", X), "b": ("const", _rand(2, 1, 4))}, (2, 4, 4), {"axis": 1}, F32),
    "Expand": ({"a": ("in", _rand(3, 1))}, (2, 3, 4), {"shape": (2, 3, 4)}, F32),
    "Conv": ({"a": ("in", IMG), "w": ("const", _rand(4, 1, 3, 3)), "b": ("const", _rand(4))}, (1, 4, 3, 3),
             {"strides": (2, 2), "pads": (1, 1, 0, 0), "dilations": (1, 1), "group": 2}, F32),
    "MaxPool": ({"a": ("in", IMG)}, (1, 2, 3, 3), {"kernel_shape": (2, 2), "strides": (2, 2), "pads": (0, 0, 0, 0)}, F32),
    "AveragePool": ({"a": ("in", IMG)}, (1, 2, 6, 6), {"kernel_shape": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1)}, F32),
    "GlobalAveragePool": ({"a": ("in", IMG)}, (1, 2, 1, 1), {}, F32),
}


def _ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_roundtrip_runs_in_onnxruntime(case):
    inputs, out_shape, attrs, out_dtype = CASES[case]
    op = case.split("_")[0]
    quant = {"qw": QSPEC} if op == "QLinear" else {"qw": QuantSpec(4, False, 1, 32, (8, 64))}
    graph, feeds = _one_node(op, inputs, out_shape, attrs, out_dtype, quant)
    model = to_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    got, want = _ort(model, feeds), run(graph, feeds)["y"]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unexpanded_quantized_ops_keep_packed_inputs():
    inputs, out_shape, attrs, _ = CASES["QLinear"]
    graph, _ = _one_node("QLinear", inputs, out_shape, attrs, quant={"qw": QSPEC})
    model = to_onnx(graph, expand_quantized=False)
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == (CUSTOM_DOMAIN, "QLinear")
    assert {i.name for i in model.graph.initializer} == {"qw", "s", "z"}
    assert any(o.domain == CUSTOM_DOMAIN for o in model.opset_import)


def test_value_info_carries_static_types():
    graph, _ = _one_node("Relu", {"a": ("in", X)}, X.shape)
    graph.add_value("r", TensorType(X.shape, F32))
    graph.nodes = [Node("Relu", "relu", ["a"], ["r"]), Node("Neg", "neg", ["r"], ["y"])]
    graph.metadata.update({"source": "x.onnx", "opset": 17})
    model = to_onnx(graph)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    assert shapes and all(all(d > 0 for d in s) for s in shapes.values())
    assert {p.key for p in model.metadata_props} >= {"source", "opset"}


@pytest.mark.slow
def test_minilm_roundtrip_matches_onnxruntime(minilm_onnx):
    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.models import minilm

    feeds = minilm.tokenize(minilm.SENTENCES[:2], 128)
    graph = load_onnx(minilm_onnx, shapes={n: (2, 128) for n in minilm.INPUT_NAMES})
    want = _ort(onnx.load(str(minilm_onnx)), feeds)
    got = _ort(to_onnx(graph), feeds)
    assert np.max(np.abs(got - want)) <= 1e-5
