"""QOperator-format import (issue 5): ConvInteger, QLinearConv, QLinearMatMul, MatMulInteger on
the int8 GEMM kernels, and onnxruntime's com.microsoft QGemm / QLinearAdd / QLinearMul /
QLinearGlobalAveragePool / QLinearAveragePool / QLinearSigmoid / QLinearLeakyRelu / QLinearConcat.

Every case compares, bit for bit, onnxruntime (no graph optimizations), qcompile's reference
interpreter and the compiled host artifact (``qcompile.compile`` + ``qcompile.load``). Scales
are chosen so that many results land on .5 ties and both saturation ends are reached.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import qcompile
from qcompile.frontends.onnx_frontend import load_onnx
from qcompile.interpreter import run

RNG = np.random.default_rng(11)
U8, S8 = np.uint8, np.int8


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws the same codes whichever tests run before it."""
    global RNG
    RNG = np.random.default_rng(11)


def _model(op, inputs, feeds, inits, attrs=None, domain=""):
    node = helper.make_node(op, list(inputs), ["y"], domain=domain, **(attrs or {}))
    vi = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    init = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    graph = helper.make_graph([node], "t", vi, [helper.make_empty_tensor_value_info("y")], init)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _ort(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _check(model, feeds, tmp_path):
    """Interpreter and compiled artifact equal onnxruntime exactly; returns onnxruntime's output."""
    ref = _ort(model, feeds)
    got = run(load_onnx(model), feeds)["y"]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    qcompile.compile(model, output=tmp_path / "out", verify=False)
    np.testing.assert_array_equal(qcompile.load(tmp_path / "out").run(feeds)["y"], ref)
    return ref


def _requant_ties(model, feeds) -> int:
    """How many rescaled accumulators (inputs of the final QuantizeLinear) sit exactly on a .5 tie."""
    graph = load_onnx(model)
    env = run(graph, feeds, keep_all=True)
    final = [n for n in graph.nodes if n.op == "QuantizeLinear"][-1]
    v = env[final.inputs[0]].astype(np.float64)
    return int(np.count_nonzero(np.abs(v - np.floor(v)) == 0.5))


def _codes(dtype, shape):
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, size=shape).astype(dtype)


def _near(dtype, center, shape, width=8):
    """Codes within ``width`` of ``center``: small accumulators, so power-of-two rescales tie often."""
    info = np.iinfo(dtype)
    return np.clip(int(center) + RNG.integers(-width, width + 1, size=shape), info.min, info.max).astype(dtype)


def _saturates(ref, dtype):
    info = np.iinfo(dtype)
    return ref.min() == info.min and ref.max() == info.max


# ---------------------------------------------------------------------------- QLinearConv
_CONV_CASES = {
    # x dtype, w dtype, x_zp, y_zp, x shape, w shape, attrs, per-channel weight scales
    "u8s8_per_channel": (U8, S8, 131, 120, (2, 4, 9, 7), (6, 4, 3, 3), {"pads": [1, 1, 1, 1]}, True),
    "s8s8_negative_zp": (S8, S8, -7, -100, (1, 3, 7, 5), (4, 3, 3, 2), {"pads": [0, 1, 2, 0], "strides": [2, 1]}, True),
    "u8u8_per_tensor": (U8, U8, 128, 0, (1, 2, 6, 6), (3, 2, 2, 2), {"dilations": [2, 2]}, False),
    "u8s8_grouped": (U8, S8, 3, 250, (1, 6, 5, 5), (4, 3, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}, True),
}


@pytest.mark.parametrize("case", sorted(_CONV_CASES))
def test_qlinear_conv(case, tmp_path):
    xd, wd, x_zp, y_zp, xs, ws, attrs, per_channel = _CONV_CASES[case]
    cout = ws[0]
    x, w = (_codes(xd, xs), _codes(wd, ws)) if per_channel else (_near(xd, x_zp, xs), _near(wd, 7 * (wd is U8), ws))
    # multiplier x_s * w_s / y_s = 4 * w_s, an exact power of two: from 1 (saturating channels,
    # odd/even ties of the small shifts) down to 2**-11 (interior values) across channels
    w_s = np.float32(2.0) ** -np.rint(np.linspace(2, 13, cout)).astype(np.float32) if per_channel else np.float32(2**-4)
    w_zp = (np.zeros(cout, wd) if per_channel else wd(0)) if wd is S8 else U8(7)
    bias = RNG.integers(-3000, 3000, size=cout).astype(np.int32) // (1 if per_channel else 100)
    inits = {"xs": np.float32(0.25), "xz": xd(x_zp), "w": w, "ws": w_s, "wz": w_zp, "ys": np.float32(1 / 16),
             "yz": xd(y_zp), "b": bias}
    model = _model("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], {"x": x}, inits, attrs)
    ref = _check(model, {"x": x}, tmp_path)
    assert _saturates(ref, xd) or not per_channel
    assert _requant_ties(model, {"x": x}) > 0
    assert len(np.unique(ref)) > 8


def test_conv_integer_zero_points_and_padding(tmp_path):
    """ConvInteger pads with the x zero point (real 0); uint8 weights with their own zero point."""
    x, w = _codes(U8, (1, 3, 6, 5)), _codes(U8, (4, 3, 3, 3))
    model = _model("ConvInteger", ["x", "w", "xz", "wz"], {"x": x}, {"w": w, "xz": U8(200), "wz": U8(100)},
                   {"pads": [2, 1, 0, 1], "strides": [1, 2]})
    ref = _check(model, {"x": x}, tmp_path)
    assert ref.dtype == np.int32 and ref.min() < 0 < ref.max()


# ---------------------------------------------------------------------------- QLinearMatMul / QGemm
@pytest.mark.parametrize("ad,bd,a_zp,b_zp,y_zp,per_column", [(U8, S8, 128, 0, 3, True), (S8, S8, -5, -9, -128, False),
                                                             (U8, U8, 0, 128, 255, False)])
def test_qlinear_matmul(ad, bd, a_zp, b_zp, y_zp, per_column, tmp_path):
    if per_column:
        a, b = _codes(ad, (2, 5, 33)), _codes(bd, (33, 7))
    else:
        a, b = _near(ad, a_zp, (2, 5, 33)), _near(bd, b_zp, (33, 7))
    # multiplier a_s * b_s / y_s = b_s / 4: 2**-2 .. 2**-14 across columns, 2**-3 per tensor
    b_s = np.float32(2.0) ** -np.arange(0, 14, 2, dtype=np.float32) if per_column else np.float32(0.5)
    inits = {"as": np.float32(0.5), "az": ad(a_zp), "b": b, "bs": b_s,
             "bz": np.full(7, b_zp, bd) if per_column else bd(b_zp), "ys": np.float32(2.0), "yz": ad(y_zp)}
    model = _model("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], {"a": a}, inits)
    ref = _check(model, {"a": a}, tmp_path)
    assert _saturates(ref, ad) or not per_column
    assert _requant_ties(model, {"a": a}) > 0
    assert len(np.unique(ref)) > 10


@pytest.mark.parametrize("ad,bd,a_zp,b_zp", [(U8, S8, 3, None), (S8, S8, -9, np.zeros(32, S8)), (U8, U8, 250, U8(128))])
def test_matmul_integer_constant_b_uses_int8_gemm(ad, bd, a_zp, b_zp):
    """A constant 8-bit B is lowered onto the int8 GEMM kernels (vpdpbusd where the CPU has
    VNNI), bit-identical to onnxruntime."""
    import tvm

    from qcompile.backends import int8_kernels
    from qcompile.backends.llvm import build, host_target

    a, b = _codes(ad, (2, 8, 64)), _codes(bd, (64, 32))
    inits = {"b": b, "az": ad(a_zp)} | ({} if b_zp is None else {"bz": b_zp})
    names = ["a", "b", "az"] + ([] if b_zp is None else ["bz"])
    model = _model("MatMulInteger", names, {"a": a}, inits)
    ref = _ort(model, {"a": a})
    graph = load_onnx(model)
    np.testing.assert_array_equal(run(graph, {"a": a})["y"], ref)
    target = host_target(1)
    ex = build(graph, target)
    got = tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(a))[0].numpy()
    np.testing.assert_array_equal(got, ref)
    if int8_kernels.vnni_supported(target):
        assert "vpdpbusd" in "".join(m.inspect_source("asm") for m in ex.mod.imports)


def test_dynamic_quantize_matmul_integer_uses_int8_gemm():
    """quantize_dynamic's pattern: the activation zero point is computed at run time."""
    import tvm

    from qcompile.backends.llvm import build, host_target
    from qcompile.backends.relax_lowering import lower_graph

    x = (RNG.standard_normal((3, 4, 64)) * 3 + 1).astype(np.float32)
    b = _codes(S8, (64, 48))
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("MatMulInteger", ["q", "b", "z"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", 1, x.shape)],
                              [helper.make_empty_tensor_value_info(v) for v in ("y", "s")], [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    ref = _ort(model, {"x": x})
    graph, target = load_onnx(model), host_target(1)
    assert any(gv.name_hint.startswith("matmul_integer") for gv in lower_graph(graph, target).get_global_vars())
    ex = build(graph, target)
    got = tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("quantized_output", [True, False])
def test_qgemm(quantized_output, tmp_path):
    a, b = _codes(U8, (3, 24)), _codes(S8, (5, 24))
    inits = {"as": np.float32(0.125), "az": U8(130), "b": b, "bs": np.float32(2.0) ** -np.arange(5, dtype=np.float32),
             "bz": np.zeros(5, S8), "c": RNG.integers(-500, 500, size=5).astype(np.int32)}
    names = ["a", "as", "az", "b", "bs", "bz", "c"]
    if quantized_output:
        inits.update(ys=np.float32(0.25), yz=U8(77))
        names += ["ys", "yz"]
    model = _model("QGemm", names, {"a": a}, inits, {"transB": 1, "alpha": 0.5}, domain="com.microsoft")
    _check(model, {"a": a}, tmp_path)


# ---------------------------------------------------------------------------- QLinearAdd
@pytest.mark.parametrize("dtype,zps,b_shape", [(U8, (250, 3, 128), (2, 3, 5, 7)), (S8, (-3, 0, 0), (2, 3, 5, 7)),
                                               (U8, (10, 20, 30), (1,)), (S8, (5, -6, 7), (1, 3, 1, 1))])
def test_qlinear_add(dtype, zps, b_shape, tmp_path):
    a, b = _codes(dtype, (2, 3, 5, 7)), _codes(dtype, b_shape)
    inits = {"as": np.float32(0.5), "az": dtype(zps[0]), "bs": np.float32(0.75), "bz": dtype(zps[1]),
             "cs": np.float32(0.5), "cz": dtype(zps[2])}  # ratios 1 and 3/2: odd codes of b give .5 ties
    if b.size == 1:
        inits["b"] = b
    feeds = {"a": a} if b.size == 1 else {"a": a, "b": b}
    model = _model("QLinearAdd", ["a", "as", "az", "b", "bs", "bz", "cs", "cz"], feeds, inits, domain="com.microsoft")
    ref = _check(model, feeds, tmp_path)
    if b.shape == a.shape:
        assert _saturates(ref, dtype)


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype,zps,b_column", [(U8, (7, 200, 31), False), (S8, (-100, 3, 60), True)])
def test_binary_every_code_pair(op, dtype, zps, b_column, tmp_path):
    """All 65536 code pairs with non-dyadic scales (b as a [256, 1] column: onnxruntime's
    scalar-per-span path); float32 rounding must match onnxruntime's kernels everywhere."""
    codes = np.arange(256, dtype=np.uint8).view(dtype)
    a = np.tile(codes, (256, 1))
    b = codes.reshape(256, 1) if b_column else np.ascontiguousarray(a.T)
    inits = {"as": np.float32(0.0371), "az": dtype(zps[0]), "bs": np.float32(0.0913), "bz": dtype(zps[1]),
             "cs": np.float32(0.0777 if op == "QLinearAdd" else 0.0319), "cz": dtype(zps[2])}
    model = _model(op, ["a", "as", "az", "b", "bs", "bz", "cs", "cz"], {"a": a, "b": b}, inits, domain="com.microsoft")
    ref = _check(model, {"a": a, "b": b}, tmp_path)
    assert len(np.unique(ref)) > 100


@pytest.mark.parametrize("dtype,zps,b_shape", [(U8, (128, 120, 130), (3, 5, 7)), (S8, (-3, 10, 0), (3, 5, 7)),
                                               (U8, (100, 9, 0), (1,))])
def test_qlinear_mul(dtype, zps, b_shape, tmp_path):
    a, b = _codes(dtype, (3, 5, 7)), _codes(dtype, b_shape)
    # ratio 0.5 * 0.25 / cs = 2**-6 (products up to 2**14: both ends saturate), or 1/2 with a
    # constant scalar b one step above its zero point (every odd a - a_zp ties)
    cs = np.float32(8.0) if b.size > 1 else np.float32(0.25)
    if b.size == 1:
        b[:] = zps[1] + 1
    inits = {"as": np.float32(0.5), "az": dtype(zps[0]), "bs": np.float32(0.25), "bz": dtype(zps[1]), "cs": cs,
             "cz": dtype(zps[2])}
    feeds = {"a": a, "b": b} if b.size > 1 else {"a": a}
    if b.size == 1:
        inits["b"] = b
    model = _model("QLinearMul", ["a", "as", "az", "b", "bs", "bz", "cs", "cz"], feeds, inits, domain="com.microsoft")
    ref = _check(model, feeds, tmp_path)
    assert len(np.unique(ref)) > 8 and (_saturates(ref, dtype) or b.size == 1)


# ---------------------------------------------------------------------------- pooling, tables, concat
@pytest.mark.parametrize("shape,x_zp,y_zp,scales,narrow", [
    ((2, 5, 2, 4), 128, 0, (4.0, 1.0), True),     # x_s / (y_s * HW) = 1/2: odd sums tie
    ((1, 4, 2, 1), 3, 200, (1.0, 1.0), False),    # HW = 2: odd sums tie
    ((1, 16, 4, 4), 128, 128, (1.0, 1 / 64), False),  # ratio 4: both ends saturate
    ((1, 3, 5, 7), 9, 17, (0.3, 0.05), False),    # odd image size, non-dyadic ratio
])
def test_qlinear_global_average_pool(shape, x_zp, y_zp, scales, narrow, tmp_path):
    x = _near(U8, x_zp, shape, 4) if narrow else _codes(U8, shape)
    inits = {"xs": np.float32(scales[0]), "xz": U8(x_zp), "ys": np.float32(scales[1]), "yz": U8(y_zp)}
    model = _model("QLinearGlobalAveragePool", ["x", "xs", "xz", "ys", "yz"], {"x": x}, inits, {"channels_last": 0},
                   domain="com.microsoft")
    ref = _check(model, {"x": x}, tmp_path)
    assert _requant_ties(model, {"x": x}) > 0 or _saturates(ref, U8) or shape[-1] == 7


@pytest.mark.parametrize("dtype,shape,attrs,scales,zps", [
    (U8, (2, 3, 9, 7), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}, (0.1, 0.05), (128, 3)),
    (S8, (1, 4, 6, 5), {"kernel_shape": [2, 3], "pads": [0, 1, 1, 0], "strides": [1, 2]}, (0.5, 0.25), (-7, 100)),
    (U8, (1, 2, 5, 5), {"kernel_shape": [2, 2]}, (1.0, 2.0), (128, 0)),  # sum / 8: ties; low end saturates
    (U8, (1, 3, 7, 7), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, (0.1, 0.05), (9, 20)),
])
def test_qlinear_average_pool(dtype, shape, attrs, scales, zps, tmp_path):
    """Float window sums in onnxruntime's order; count excludes padding; y_zp added before rounding."""
    x = _codes(dtype, shape)
    inits = {"xs": np.float32(scales[0]), "xz": dtype(zps[0]), "ys": np.float32(scales[1]), "yz": dtype(zps[1])}
    model = _model("QLinearAveragePool", ["x", "xs", "xz", "ys", "yz"], {"x": x}, inits, attrs, domain="com.microsoft")
    ref = _check(model, {"x": x}, tmp_path)
    assert len(np.unique(ref)) > 8


@pytest.mark.parametrize("dtype,x_zp,y_zp", [(U8, 100, 30), (S8, -20, 5)])
def test_qlinear_leaky_relu(dtype, x_zp, y_zp, tmp_path):
    x = np.arange(256, dtype=np.uint8).view(dtype).reshape(4, 64)
    inits = {"xs": np.float32(0.05), "xz": dtype(x_zp), "ys": np.float32(0.002), "yz": dtype(y_zp)}
    model = _model("QLinearLeakyRelu", ["x", "xs", "xz", "ys", "yz"], {"x": x}, inits, {"alpha": 0.1},
                   domain="com.microsoft")
    ref = _check(model, {"x": x}, tmp_path)
    assert _saturates(ref, dtype)


@pytest.mark.parametrize("dtype,x_s,x_zp,y_s,y_zp", [(U8, 0.05, 128, 1 / 256, 0), (S8, 0.1, -10, 1 / 256, -128),
                                                    (U8, 0.3, 30, 1 / 300, 10)])
def test_qlinear_sigmoid(dtype, x_s, x_zp, y_s, y_zp, tmp_path):
    """Every code once: the table equals onnxruntime's (MLAS's logistic approximation, not exp)."""
    x = np.arange(256, dtype=np.uint8).view(dtype).reshape(8, 32)
    inits = {"xs": np.float32(x_s), "xz": dtype(x_zp), "ys": np.float32(y_s), "yz": dtype(y_zp)}
    model = _model("QLinearSigmoid", ["x", "xs", "xz", "ys", "yz"], {"x": x}, inits, domain="com.microsoft")
    ref = _check(model, {"x": x}, tmp_path)
    assert len(np.unique(ref)) > 20


def test_mlas_logistic_matches_onnxruntime_sigmoid():
    from qcompile.frontends.qoperator_tables import mlas_logistic

    x = np.concatenate([np.linspace(-20, 20, 801), RNG.standard_normal(400) * 6]).astype(np.float32)
    model = _model("Sigmoid", ["x"], {"x": x}, {})
    ref = _ort(model, {"x": x})
    np.testing.assert_array_equal(mlas_logistic(x), ref)
    assert np.count_nonzero((1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32) != ref) > 100


def test_qlinear_concat_mixed_scales(tmp_path):
    """One input shares the output's (scale, zero point) and is copied, the other is requantized."""
    a, b = _codes(U8, (1, 2, 3)), _codes(U8, (1, 5, 3))
    inits = {"ys": np.float32(0.5), "yz": U8(100), "as": np.float32(0.5), "az": U8(100), "bs": np.float32(0.25),
             "bz": U8(7)}
    model = _model("QLinearConcat", ["ys", "yz", "a", "as", "az", "b", "bs", "bz"], {"a": a, "b": b}, inits,
                   {"axis": 1}, domain="com.microsoft")
    ref = _check(model, {"a": a, "b": b}, tmp_path)
    np.testing.assert_array_equal(ref[:, :2], a)


def test_qoperator_recipe_and_integer_graph():
    """QLinearConv keeps integer stages: ConvInteger, an int32 bias Add, then one float rescale."""
    x, w = _codes(U8, (1, 2, 4, 4)), _codes(S8, (3, 2, 1, 1))
    inits = {"xs": np.float32(0.1), "xz": U8(1), "w": w, "ws": np.float32([0.1, 0.2, 0.3]), "wz": np.zeros(3, S8),
             "ys": np.float32(0.3), "yz": U8(2), "b": np.int32([1, 2, 3])}
    graph = load_onnx(_model("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], {"x": x}, inits))
    assert [n.op for n in graph.nodes] == ["ConvInteger", "Add", "Cast", "Mul", "QuantizeLinear"]
    assert graph.type_of(graph.nodes[1].outputs[0]).dtype == "int32"
    assert [(e["op"], e["granularity"]) for e in graph.metadata["quant_recipe"]] == [("QLinearConv", "per_axis(0)")]


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("kind,activations,weights,per_channel", [
    ("resnet", "QUInt8", "QInt8", True), ("resnet", "QInt8", "QInt8", True), ("resnet", "QUInt8", "QUInt8", False),
    ("mixed", "QUInt8", "QInt8", True),
])
def test_quantize_static_qoperator_cnn_matches_onnxruntime(kind, activations, weights, per_channel, tmp_path):
    """Torch CNNs quantized by onnxruntime's quantize_static (QOperator) compile for the host and
    equal onnxruntime bit for bit, with and without its graph optimizations."""
    from qoperator_cnn import quantized_cnn

    path, inputs = quantized_cnn(tmp_path, kind, activations, weights, per_channel)
    qcompile.compile(str(path), output=tmp_path / "out", eval_inputs={"x": inputs[0]})
    model = qcompile.load(tmp_path / "out")
    assert any(e.get("source") == "QLinearConv" for e in model.manifest["recipe"])
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for x in inputs:
            np.testing.assert_array_equal(model.run({"x": x})["y"], sess.run(None, {"x": x})[0])
