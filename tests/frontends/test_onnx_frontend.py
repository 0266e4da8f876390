"""ONNX frontend: per-op tiny models (load_onnx + interpreter vs onnxruntime), errors, MiniLM."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import ModelFormatError, ShapeError, UnsupportedOpError
from qcompile.frontends.onnx_frontend import load_onnx
from qcompile.interpreter import run
from qcompile.ops import ALL_OPS

RNG = np.random.default_rng(0)
F, I = TensorProto.FLOAT, TensorProto.INT64


def _rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, feeds, inits=None, opset=17, out_type=F, outputs=("y",), extra_opsets=()):
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(o, out_type, None) for o in outputs]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, "t", inputs, outs, inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _node(op, ins, outs=("y",), **kw):
    return helper.make_node(op, list(ins), list(outs), name=f"{op}_{outs[0]}", **kw)


def _i64(*v):
    return np.asarray(v, dtype=np.int64)


X = _rand(2, 3, 4)
POS = np.abs(X) + 0.5
IMG = _rand(2, 3, 8, 8)
BOOLS = {"a": X > 0, "b": X < 0.5}

# id -> (nodes, feeds, initializers, opset, output elem type)
CASES = {
    "add_broadcast": ([_node("Add", ["x", "c"])], {"x": X}, {"c": _rand(4)}, 17, F),
    **{f"binary_{op}": ([_node(op, ["x", "c"])], {"x": POS}, {"c": _rand(3, 1) ** 2 + 0.5}, 17, F)
       for op in ["Sub", "Mul", "Div", "Pow"]},
    **{f"variadic_{op}": ([_node(op, ["x", "c", "d"])], {"x": X}, {"c": _rand(4), "d": _rand(3, 1)}, 17, F)
       for op in ["Max", "Min", "Sum", "Mean"]},
    **{f"compare_{op}": ([_node(op, ["x", "c"])], {"x": X}, {"c": np.float32(0.1)}, 17, TensorProto.BOOL)
       for op in ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"]},
    **{f"logic_{op}": ([_node(op, ["a", "b"])], BOOLS, {}, 17, TensorProto.BOOL) for op in ["And", "Or"]},
    "logic_Not": ([_node("Not", ["a"])], {"a": BOOLS["a"]}, {}, 17, TensorProto.BOOL),
    **{f"unary_{op}": ([_node(op, ["x"])], {"x": POS if op in ("Sqrt", "Log") else X}, {}, 17, F)
       for op in ["Sqrt", "Erf", "Tanh", "Relu", "Sigmoid", "Exp", "Log", "Neg", "Abs", "Reciprocal"]},
    "isnan_where": ([_node("Div", ["x", "x"], ["q"]), _node("IsNaN", ["q"], ["n"]), _node("Where", ["n", "c", "q"])],
                    {"x": np.where(X > 0, X, 0).astype(np.float32)}, {"c": np.float32(0)}, 17, F),
    "where_expand": ([_node("Less", ["x", "z"], ["m"]), _node("Expand", ["m", "s"], ["me"]),
                      _node("Where", ["me", "x", "c"])],
                     {"x": _rand(3, 1)}, {"z": np.float32(0), "s": _i64(2, 3, 4), "c": _rand(4)}, 17, F),
    "clip_inputs": ([_node("Clip", ["x", "lo", "hi"])], {"x": X}, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}, 17, F),
    "clip_min_only": ([_node("Clip", ["x", "lo", ""])], {"x": X}, {"lo": np.float32(-0.5)}, 17, F),
    "clip_attrs_opset6": ([_node("Clip", ["x"], min=-0.5, max=0.5)], {"x": X}, {}, 6, F),
    "gelu_opset20": ([_node("Gelu", ["x"])], {"x": X}, {}, 20, F),
    "gelu_tanh_opset20": ([_node("Gelu", ["x"], approximate="tanh")], {"x": X}, {}, 20, F),
    "cast_int": ([_node("Cast", ["x"], to=TensorProto.INT32)], {"x": X * 10}, {}, 17, TensorProto.INT32),
    "softmax": ([_node("Softmax", ["x"], axis=1)], {"x": X}, {}, 17, F),
    "softmax_opset11_2d_coerce": ([_node("Softmax", ["x"], axis=1)], {"x": X}, {}, 11, F),
    "layernorm": ([_node("LayerNormalization", ["x", "g", "b"], epsilon=1e-3)], {"x": X},
                  {"g": _rand(4), "b": _rand(4)}, 17, F),
    "layernorm_axis_m2": ([_node("LayerNormalization", ["x", "g"], axis=-2)], {"x": X}, {"g": _rand(3, 4)}, 17, F),
    "reduce_mean_attr": ([_node("ReduceMean", ["x"], axes=[-1])], {"x": X}, {}, 17, F),
    "reduce_sum_input": ([_node("ReduceSum", ["x", "ax"], keepdims=0)], {"x": X}, {"ax": _i64(0, 2)}, 17, F),
    "reduce_max_opset18": ([_node("ReduceMax", ["x", "ax"])], {"x": X}, {"ax": _i64(1)}, 18, F),
    "reduce_min_all": ([_node("ReduceMin", ["x"], keepdims=0)], {"x": X}, {}, 17, F),
    "reduce_l2": ([_node("ReduceL2", ["x"], axes=[1, 2])], {"x": X}, {}, 17, F),
    "matmul_const": ([_node("MatMul", ["x", "w"])], {"x": X}, {"w": _rand(4, 5)}, 17, F),
    "matmul_batched": ([_node("MatMul", ["x", "x2"])], {"x": X, "x2": _rand(2, 4, 3)}, {}, 17, F),
    "gemm_transB": ([_node("Gemm", ["m", "w", "c"], transB=1)], {"m": _rand(3, 4)}, {"w": _rand(5, 4), "c": _rand(5)}, 17, F),
    "gemm_transA_alpha_beta_fullC": ([_node("Gemm", ["m", "w", "c"], transA=1, alpha=0.5, beta=2.0)],
                                     {"m": _rand(4, 3)}, {"w": _rand(4, 5), "c": _rand(3, 5)}, 17, F),
    "gemm_dynamic_B": ([_node("Gemm", ["m", "w", "c"], transB=1, alpha=2.0)], {"m": _rand(3, 4), "w": _rand(5, 4)},
                       {"c": _rand(1, 5)}, 17, F),
    "batchnorm": ([_node("BatchNormalization", ["x", "s", "b", "mu", "var"], epsilon=1e-3)], {"x": IMG},
                  {"s": _rand(3), "b": _rand(3), "mu": _rand(3), "var": np.abs(_rand(3)) + 0.1}, 17, F),
    "conv_pools": ([_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), _node("Relu", ["c"], ["r"]),
                    _node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                    _node("AveragePool", ["p"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                    _node("GlobalAveragePool", ["a"])], {"x": IMG}, {"w": _rand(4, 3, 3, 3), "b": _rand(4)}, 17, F),
    "conv_group_stride_same": ([_node("Conv", ["x", "w"], auto_pad="SAME_UPPER", strides=[2, 2], group=3)],
                               {"x": IMG}, {"w": _rand(6, 1, 3, 3)}, 17, F),
    "conv_dilated": ([_node("Conv", ["x", "w"], pads=[0, 2, 1, 0], dilations=[1, 2], strides=[1, 2])],
                     {"x": IMG}, {"w": _rand(2, 3, 3, 2)}, 17, F),
    "global_max_pool": ([_node("GlobalMaxPool", ["x"])], {"x": IMG}, {}, 17, F),
    "reshape_0_m1": ([_node("Reshape", ["x", "s"])], {"x": X}, {"s": _i64(0, -1)}, 17, F),
    "squeeze_unsqueeze_13": ([_node("Unsqueeze", ["x", "a"], ["u"]), _node("Squeeze", ["u", "b"])], {"x": X},
                             {"a": _i64(0, -1), "b": _i64(-1)}, 13, F),
    "squeeze_unsqueeze_11": ([_node("Unsqueeze", ["x"], ["u"], axes=[1]), _node("Squeeze", ["u"], axes=[1])],
                             {"x": X}, {}, 11, F),
    "flatten": ([_node("Flatten", ["x"], axis=2)], {"x": X}, {}, 17, F),
    "transpose": ([_node("Transpose", ["x"], perm=[2, 0, 1])], {"x": X}, {}, 17, F),
    "concat_neg_axis": ([_node("Concat", ["x", "c"], axis=-1)], {"x": X}, {"c": _rand(2, 3, 2)}, 17, F),
    "gather_axis1_neg": ([_node("Gather", ["x", "i"], axis=1)], {"x": X}, {"i": _i64(-1, 0)}, 17, F),
    "gather_embedding": ([_node("Gather", ["t", "ids"])], {"ids": _i64(3, 0, 7).reshape(1, 3)}, {"t": _rand(8, 4)}, 17, F),
    "gather_nd_const_indices": ([_node("GatherND", ["x", "i"])], {"x": X},
                                {"i": np.asarray([[[1, -1], [0, 0]]], dtype=np.int64)}, 17, F),
    "slice_negative": ([_node("Slice", ["x", "st", "en", "ax"])], {"x": X}, {"st": _i64(-3, 1), "en": _i64(-1, 100),
                                                                          "ax": _i64(-1, 1)}, 17, F),
    "slice_negative_step": ([_node("Slice", ["x", "st", "en", "ax", "sp"])], {"x": X},
                            {"st": _i64(-1), "en": _i64(-100), "ax": _i64(2), "sp": _i64(-2)}, 17, F),
    "split": ([_node("Split", ["x", "s"], ["y0", "y1"], axis=2), _node("Mul", ["y0", "y1"])], {"x": X},
              {"s": _i64(2, 2)}, 17, F),
    "identity_dropout": ([_node("Identity", ["x"], ["i"]), _node("Dropout", ["i"], ["d"]), _node("Relu", ["d"])],
                         {"x": X}, {}, 17, F),
    "shape_subgraph_folds": ([_node("Shape", ["x"], ["sh"]), _node("Gather", ["sh", "zero"], ["b"]),
                              _node("Unsqueeze", ["b", "ax0"], ["bu"]), _node("Concat", ["bu", "m1"], ["tgt"], axis=0),
                              _node("Reshape", ["x", "tgt"], ["r"]), _node("ConstantOfShape", ["shr"], ["ones"],
                                                                         value=numpy_helper.from_array(np.ones(1, np.float32))),
                              _node("Shape", ["r"], ["shr"]), _node("Range", ["zf", "twelve", "onef"], ["rng"]),
                              _node("Mul", ["r", "ones"], ["r2"]), _node("Add", ["r2", "rng"])],
                             {"x": X}, {"zero": np.int64(0), "ax0": _i64(0), "m1": _i64(-1), "zf": np.float32(0),
                                        "twelve": np.float32(12), "onef": np.float32(1)}, 17, F),
}


def _sorted_nodes(nodes):
    """Put nodes in topological order (CASES lists a few out of order for readability)."""
    done, order, pending = set(), [], list(nodes)
    while pending:
        node = next(n for n in pending if all(i in done or not i or i not in {o for m in pending for o in m.output}
                                               for i in n.input))
        pending.remove(node)
        order.append(node)
        done.update(node.output)
    return order


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime(case):
    nodes, feeds, inits, opset, out_type = CASES[case]
    model = _model(_sorted_nodes(nodes), feeds, inits, opset, out_type)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    graph = load_onnx(model)
    assert {n.op for n in graph.nodes} <= ALL_OPS
    got = run(graph, feeds)["y"]
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_shape_subgraph_is_folded_away():
    nodes, feeds, inits, opset, out_type = CASES["shape_subgraph_folds"]
    graph = load_onnx(_model(_sorted_nodes(nodes), feeds, inits, opset))
    assert [n.op for n in graph.nodes] == ["Reshape", "Mul", "Add"]
    assert graph.nodes[0].attrs["shape"] == (2, 12)


def test_gemm_becomes_linear_with_transposed_weight():
    nodes, feeds, inits, opset, _ = CASES["gemm_transB"]
    graph = load_onnx(_model(nodes, feeds, inits, opset))
    (linear,) = graph.nodes
    assert linear.op == "Linear" and graph.constants[linear.inputs[1]].shape == (4, 5)
    assert graph.metadata["source"] == "<ModelProto>" and graph.metadata["opset"] == 17


def test_operand_dtype_mismatch_is_a_format_error():
    model = _model([_node("MatMul", ["x", "w"])], {"x": X}, {"w": np.ones((4, 2))})  # float64 weight
    with pytest.raises(ModelFormatError, match="MatMul_y.*float32 and float64"):
        load_onnx(model)


def test_com_microsoft_gelu():
    model = _model([helper.make_node("Gelu", ["x"], ["y"], name="g", domain="com.microsoft")], {"x": X},
                   extra_opsets=[("com.microsoft", 1)])
    graph = load_onnx(model)
    assert [n.op for n in graph.nodes] == ["Gelu"]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    np.testing.assert_allclose(run(graph, {"x": X})["y"], ref, atol=1e-6)


@pytest.mark.parametrize("op", ["NonMaxSuppression", "MadeUpOp"])
def test_unsupported_op_names_node(op):
    model = _model([helper.make_node(op, ["x", "x"], ["y"], name="the_node")], {"x": X})
    with pytest.raises(UnsupportedOpError, match=f"{op}.*the_node"):
        load_onnx(model)


def test_malformed_file_names_file(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff\xff")
    with pytest.raises(ModelFormatError, match="broken.onnx"):
        load_onnx(bad)
    with pytest.raises(ModelFormatError, match="missing.onnx"):
        load_onnx(tmp_path / "missing.onnx")


def _dynamic_model():
    x = helper.make_tensor_value_info("input_ids", F, ["batch", 4])
    graph = helper.make_graph([_node("Relu", ["input_ids"])], "d", [x], [helper.make_tensor_value_info("y", F, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_input_needs_binding():
    with pytest.raises(ShapeError, match=r"input 'input_ids' dimension 0 \('batch'\) is symbolic.*input_ids=Nx4"):
        load_onnx(_dynamic_model())
    with pytest.raises(ShapeError, match="rank"):
        load_onnx(_dynamic_model(), shapes={"input_ids": (2, 4, 1)})
    with pytest.raises(ShapeError, match="fixed to 4"):
        load_onnx(_dynamic_model(), shapes={"input_ids": (2, 5)})
    graph = load_onnx(_dynamic_model(), shapes={"input_ids": (3, 4)})
    assert graph.type_of("input_ids").shape == (3, 4)


def test_initializer_graph_input_is_constant():
    model = _model([_node("Add", ["x", "c"])], {"x": X}, {"c": _rand(4)})
    model.graph.input.append(helper.make_tensor_value_info("c", F, [4]))
    graph = load_onnx(model)
    assert graph.inputs == ["x"] and graph.nodes[0].inputs[1] in graph.constants


def test_output_name_survives_identity():
    model = _model([_node("Relu", ["x"], ["r"]), _node("Identity", ["r"])], {"x": X})
    graph = load_onnx(model)
    assert graph.outputs == ["y"] and [n.op for n in graph.nodes] == ["Relu"]


def test_constant_and_input_outputs_keep_their_names():
    c = helper.make_node("Constant", [], ["k"], name="c", value=numpy_helper.from_array(_rand(2)))
    model = _model([c, _node("Identity", ["k"], ["y"]), _node("Identity", ["x"], ["z"])], {"x": X},
                   outputs=("y", "z"))
    graph = load_onnx(model)
    assert graph.outputs == ["y", "z"] and "y" in graph.constants
    out = run(graph, {"x": X})
    np.testing.assert_array_equal(out["z"], X)


@pytest.mark.slow
def test_minilm_import_matches_onnxruntime(minilm_onnx):
    from qcompile.models import minilm

    feeds = minilm.tokenize(minilm.SENTENCES[:2], 128)
    assert (feeds["attention_mask"] == 0).any()
    start = time.perf_counter()
    graph = load_onnx(minilm_onnx, shapes={n: (2, 128) for n in minilm.INPUT_NAMES})
    assert time.perf_counter() - start < 5.0
    assert {n.op for n in graph.nodes} <= ALL_OPS
    assert sum(n.op == "MatMul" for n in graph.nodes) == 48 and sum(n.op == "LayerNorm" for n in graph.nodes) == 13
    ref = ort.InferenceSession(str(minilm_onnx), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = run(graph, feeds)["embedding"]
    assert np.max(np.abs(got - ref)) <= 1e-5


def test_gather_with_scalar_constant_index_drops_the_axis():
    """x[0] exports as Gather(axis 0, 0-d index): the output loses that axis."""
    nodes = [helper.make_node("Gather", ["x", "i"], ["y"], axis=0, name="pick"),
             helper.make_node("MatMul", ["y", "w"], ["z"], name="mm")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(0, dtype=np.int64), "i"),
         numpy_helper.from_array(np.ones((4, 2), np.float32), "w")],
    )
    ir = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert ir.type_of("z").shape == (2, 2)
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    np.testing.assert_allclose(run(ir, {"x": x})["z"], x[0] @ np.ones((4, 2), np.float32), rtol=1e-6)
