"""Lowering IR -> Relax -> host library, checked against numpy, one graph per op family."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special as sp

from qcompile.errors import UnsupportedOpError
from qcompile.ir import Graph, Node, TensorType, verify
from qcompile.quant import pack_codes

RNG_SEED = 0


def _compile_run(tmp_path, nodes, inputs, consts, expected, outputs, quant=None, rtol=1e-5, atol=1e-5):
    """Build a graph (value types taken from ``expected``), compile, run, compare."""
    from qcompile.backends import llvm
    from qcompile.backends.runtime import HostModule

    g = Graph("t", list(inputs), list(outputs), [], {}, {})
    for name, arr in inputs.items():
        g.add_value(name, TensorType(arr.shape, str(arr.dtype)))
    for name, arr in consts.items():
        g.add_constant(name, arr, (quant or {}).get(name))
    for i, (op, ins, outs, attrs) in enumerate(nodes):
        for o in outs:
            g.add_value(o, TensorType(expected[o].shape, str(expected[o].dtype)))
        g.nodes.append(Node(op, f"n{i}_{op}", list(ins), list(outs), dict(attrs)))
    verify(g)
    path = tmp_path / "model.so"
    llvm.export_library(llvm.build(g), path)
    got = HostModule(path, g.inputs, g.outputs, num_threads=2)(inputs)
    for name in outputs:
        assert got[name].dtype == expected[name].dtype, name
        assert got[name].shape == expected[name].shape, name
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=atol, err_msg=name)
    return path


def _rand(*shape, seed=RNG_SEED):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Max": np.maximum,
          "Min": np.minimum, "Equal": np.equal, "Less": np.less, "Greater": np.greater,
          "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal}


def test_binary_broadcast(tmp_path):
    a, b = _rand(2, 3, 4), _rand(3, 1, seed=1)
    a[0, 0, 0] = b[0, 0]  # exercise Equal
    nodes = [(op, ["a", "b"], [op], {}) for op in BINARY]
    expected = {op: fn(a, b) for op, fn in BINARY.items()}
    nodes += [("Pow", ["pa", "b"], ["Pow"], {}), ("Greater", ["a", "z"], ["ga"], {}), ("Less", ["b", "z"], ["lb"], {}),
              ("And", ["ga", "lb"], ["And"], {}), ("Or", ["ga", "lb"], ["Or"], {})]
    pa = np.abs(a) + 0.5
    z = np.zeros(1, np.float32)
    expected.update(Pow=np.power(pa, b), ga=a > 0, lb=b < 0)
    expected.update(And=(a > 0) & (b < 0), Or=(a > 0) | (b < 0))
    _compile_run(tmp_path, nodes, {"a": a, "b": b}, {"pa": pa, "z": z}, expected,
                 list(BINARY) + ["Pow", "And", "Or"])


def test_unary_and_misc(tmp_path):
    x = _rand(3, 5)
    pos = np.abs(x) + 0.1
    x_nan = x.copy()
    x_nan[1, 2] = np.nan
    cases = {
        "Sqrt": ("p", np.sqrt(pos)), "Log": ("p", np.log(pos)), "Reciprocal": ("p", 1 / pos),
        "Erf": ("x", sp.erf(x)), "Tanh": ("x", np.tanh(x)), "Relu": ("x", np.maximum(x, 0)),
        "Sigmoid": ("x", sp.expit(x)), "Exp": ("x", np.exp(x)), "Neg": ("x", -x), "Abs": ("x", np.abs(x)),
        "Identity": ("x", x), "IsNaN": ("xn", np.isnan(x_nan)),
    }
    nodes = [(op, [src], [op], {}) for op, (src, _) in cases.items()]
    expected = {op: ref for op, (_, ref) in cases.items()}
    h = x + 0.0
    more = [
        ("Not", ["IsNaN"], ["Not"], {}, ~np.isnan(x_nan)),
        ("Where", ["IsNaN", "x", "p"], ["Where"], {}, np.where(np.isnan(x_nan), x, pos)),
        ("Clip", ["x"], ["Clip"], {"min": -0.5, "max": 0.25}, np.clip(x, -0.5, 0.25)),
        ("Clip", ["x"], ["ClipLo"], {"min": 0.0, "max": None}, np.maximum(x, 0)),
        ("Gelu", ["x"], ["Gelu"], {"approximate": "none"}, 0.5 * h * (1 + sp.erf(h / np.sqrt(2)))),
        ("Gelu", ["x"], ["GeluT"], {"approximate": "tanh"},
         0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))),
        ("Cast", ["x"], ["Cast"], {"to": "int32"}, x.astype(np.int32)),
    ]
    nodes += [m[:4] for m in more]
    expected.update({m[2][0]: m[4].astype(m[4].dtype) for m in more})
    expected = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in expected.items()}
    _compile_run(tmp_path, nodes, {"x": x}, {"p": pos, "xn": x_nan}, expected, list(expected))


def test_reductions_softmax_layernorm(tmp_path):
    x = _rand(2, 6, 8)
    scale, bias = _rand(8, seed=1), _rand(8, seed=2)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ln = (x - mu) / np.sqrt(var + 1e-12)
    mu2 = x.mean((1, 2), keepdims=True)
    ln2 = (x - mu2) / np.sqrt(x.var((1, 2), keepdims=True) + 1e-5)
    e = np.exp(x - x.max(1, keepdims=True))
    nodes_ref = [
        ("ReduceMean", ["x"], ["mean"], {"axes": (-1,), "keepdims": True}, x.mean(-1, keepdims=True)),
        ("ReduceSum", ["x"], ["sum"], {"axes": (0, 2), "keepdims": False}, x.sum((0, 2))),
        ("ReduceMax", ["x"], ["max"], {"axes": (1,), "keepdims": False}, x.max(1)),
        ("ReduceMin", ["x"], ["min"], {"axes": (), "keepdims": True}, x.min(keepdims=True)),
        ("ReduceL2", ["x"], ["l2"], {"axes": (2,), "keepdims": True}, np.sqrt((x * x).sum(2, keepdims=True))),
        ("Softmax", ["x"], ["softmax"], {"axis": 1}, e / e.sum(1, keepdims=True)),
        ("LayerNorm", ["x", "scale", "bias"], ["ln"], {"axis": -1, "epsilon": 1e-12}, ln * scale + bias),
        ("LayerNorm", ["x", "s2"], ["ln2"], {"axis": 1, "epsilon": 1e-5}, ln2 * 2.0),
    ]
    expected = {n[2][0]: n[4].astype(np.float32) for n in nodes_ref}
    _compile_run(tmp_path, [n[:4] for n in nodes_ref], {"x": x},
                 {"scale": scale, "bias": bias, "s2": np.full((6, 8), 2.0, np.float32)}, expected, list(expected))


def test_row_reductions_vector_width(tmp_path):
    """Rows a multiple of the vector width take the rfactor schedule (RowReduction)."""
    x = _rand(2, 3, 64) * 4
    scale, bias = _rand(64, seed=1), _rand(64, seed=2)
    e = np.exp(x - x.max(-1, keepdims=True))
    sm = e / e.sum(-1, keepdims=True)
    nodes = [("Softmax", ["x"], ["sm"], {"axis": -1}), ("IsNaN", ["sm"], ["nan"], {}),
             ("Where", ["nan", "zero", "sm"], ["masked"], {}),
             ("Add", ["x", "x"], ["x2"], {}), ("LayerNorm", ["x2", "scale", "bias"], ["ln"], {"axis": -1, "epsilon": 1e-12}),
             ("ReduceMax", ["x"], ["mx"], {"axes": (-1,), "keepdims": True}),
             ("Sub", ["x", "mx"], ["centred"], {})]
    ln2 = (2 * x - 2 * x.mean(-1, keepdims=True)) / np.sqrt(4 * x.var(-1, keepdims=True) + 1e-12) * scale + bias
    expected = {"sm": sm, "nan": np.isnan(sm), "masked": sm, "x2": 2 * x, "ln": ln2, "mx": x.max(-1, keepdims=True),
                "centred": x - x.max(-1, keepdims=True)}
    expected = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in expected.items()}
    _compile_run(tmp_path, nodes, {"x": x}, {"scale": scale, "bias": bias, "zero": np.zeros(1, np.float32)},
                 expected, ["masked", "ln", "centred"], rtol=1e-5, atol=1e-5)


def test_data_movement(tmp_path):
    x = _rand(2, 3, 4)
    idx = np.array([[0, -1], [2, 1]], np.int64)
    cases = [
        ("Reshape", ["x"], ["reshape"], {"shape": (6, 4)}, x.reshape(6, 4)),
        ("Transpose", ["x"], ["transpose"], {"perm": (2, 0, 1)}, x.transpose(2, 0, 1)),
        ("Gather", ["x", "idx"], ["gather"], {"axis": 1}, np.take(x, np.where(idx < 0, idx + 3, idx), axis=1)),
        ("Slice", ["x"], ["slice"], {"starts": (1, 0), "ends": (4, 3), "axes": (2, 1), "steps": (2, 1)},
         x[:, 0:3, 1:4:2]),
        ("Concat", ["x", "x"], ["concat"], {"axis": 1}, np.concatenate([x, x], 1)),
        ("Expand", ["row"], ["expand"], {"shape": (2, 3, 4)}, np.broadcast_to(x[0, 0], (2, 3, 4))),
    ]
    expected = {c[2][0]: np.ascontiguousarray(c[4]) for c in cases}
    _compile_run(tmp_path, [c[:4] for c in cases], {"x": x, "idx": idx}, {"row": x[0, 0].reshape(1, 4).copy()},
                 expected, list(expected))


def test_matmul_and_linear(tmp_path):
    a, b = _rand(2, 3, 4, 5), _rand(3, 5, 6, seed=1)
    w, bias = _rand(5, 7, seed=2), _rand(7, seed=3)
    v = _rand(5, seed=4)
    cases = [
        ("MatMul", ["a", "b"], ["bmm"], a @ b),           # broadcast batch dims
        ("MatMul", ["a", "w"], ["mm_const"], a @ w),     # one matrix: folded into rows
        ("MatMul", ["a", "v"], ["mv"], a @ v),           # 1-D right operand
        ("Linear", ["a", "w", "bias"], ["linear"], a @ w + bias),
        ("Linear", ["a", "w"], ["linear_nb"], a @ w),
    ]
    expected = {c[2][0]: c[3].astype(np.float32) for c in cases}
    _compile_run(tmp_path, [(*c[:3], {}) for c in cases], {"a": a, "b": b}, {"w": w, "bias": bias, "v": v},
                 expected, list(expected), rtol=1e-4, atol=1e-4)


def _quantize(rng, k, n, bits, group_size, symmetric):
    """Random codes packed the QLinear way, with the float weight they stand for."""
    from qcompile.ir import QuantSpec
    from qcompile.quant import dequantize_weight

    groups = k // group_size if group_size else 1
    codes = rng.integers(0, 1 << bits, size=(n, k)).astype(np.uint8)
    scales = (rng.random((n, groups)) * 0.1 + 0.01).astype(np.float32)
    zeros = None if symmetric else rng.integers(0, 1 << bits, size=(n, groups)).astype(np.float32)
    packed = pack_codes(codes, bits)
    spec = QuantSpec(bits, symmetric, 0, group_size, (k, n))
    return packed, scales, zeros, spec, dequantize_weight(packed, scales, zeros, bits, group_size, k)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 0, True), (8, 0, True), (3, 16, False), (2, 32, True)])
def test_qlinear_and_qgather(tmp_path, bits, group_size, symmetric):
    rng = np.random.default_rng(bits)
    x, bias = _rand(2, 3, 64), _rand(24, seed=1)
    packed, scales, zeros, spec, w = _quantize(rng, 64, 24, bits, group_size, symmetric)
    consts = {"q": packed, "s": scales, "bias": bias}
    quant = {"q": spec}
    z = [""] if symmetric else ["z"]  # absent optional inputs are ""
    if not symmetric:
        consts["z"] = zeros
    attrs = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    # the same packed tensor read as an embedding table of 24 rows x 64 columns
    from dataclasses import replace

    table = replace(spec, logical_shape=(24, 64))
    consts["t"] = packed.copy()
    quant["t"] = table
    idx = np.array([[0, 5, 23], [-1, 7, 7]], np.int64)
    nodes = [("QLinear", ["x", "q", "s", *z, "bias"], ["y"], attrs),
             ("QLinear", ["x", "q", "s", *z][: 3 if symmetric else 4], ["y_nb"], attrs),
             ("QGather", ["t", "s", *z, "idx"], ["emb"], attrs)]
    expected = {"y": x @ w + bias, "y_nb": x @ w, "emb": w.T[np.where(idx < 0, idx + 24, idx)]}
    expected = {k: v.astype(np.float32) for k, v in expected.items()}
    _compile_run(tmp_path, nodes, {"x": x, "idx": idx}, consts, expected, list(expected), quant=quant,
                 rtol=1e-4, atol=1e-4)


def test_packed_weights_stay_packed(tmp_path):
    """A 4-bit 1024x1024 weight (512 KiB packed, 4 MiB as float) keeps the library small."""
    rng = np.random.default_rng(1)
    packed, scales, _, spec, w = _quantize(rng, 1024, 1024, 4, 0, True)
    x = _rand(1, 1024)
    path = _compile_run(tmp_path, [("QLinear", ["x", "q", "s"], ["y"], {"bits": 4, "group_size": 0, "symmetric": True})],
                        {"x": x}, {"q": packed, "s": scales}, {"y": (x @ w).astype(np.float32)}, ["y"],
                        quant={"q": spec}, rtol=1e-3, atol=1e-3)
    assert path.stat().st_size < 2 * packed.nbytes, path.stat().st_size


def test_conv_and_pools(tmp_path):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b = _rand(1, 4, 9, 9), _rand(6, 2, 3, 3, seed=1), _rand(6, seed=2)
    tx = torch.from_numpy(x)
    conv = F.conv2d(tx, torch.from_numpy(w), torch.from_numpy(b), stride=2, padding=1, dilation=1, groups=2)
    cases = [
        ("Conv", ["x", "w", "b"], ["conv"], {"strides": (2, 2), "pads": (1, 1, 1, 1), "dilations": (1, 1), "group": 2},
         conv),
        ("MaxPool", ["x"], ["maxpool"], {"kernel_shape": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)},
         F.max_pool2d(tx, 3, 2, 1)),
        ("AveragePool", ["x"], ["avgpool"], {"kernel_shape": (2, 2), "strides": (2, 2), "pads": (0, 0, 0, 0)},
         F.avg_pool2d(tx, 2, 2)),
        ("GlobalAveragePool", ["x"], ["gap"], {}, tx.mean((2, 3), keepdim=True)),
    ]
    expected = {c[2][0]: c[4].numpy() for c in cases}
    _compile_run(tmp_path, [c[:4] for c in cases], {"x": x}, {"w": w, "b": b}, expected, list(expected),
                 rtol=1e-4, atol=1e-4)


def test_transformer_block(tmp_path):
    """Linear QKV, 2-head softmax attention (reshape/transpose/MatMul), residual, LayerNorm, Gelu FFN."""
    s, d, h, f = 8, 16, 2, 32
    hd = d // h
    x = _rand(1, s, d)
    wqkv, wo, w1, w2 = (_rand(*shape, seed=i) * 0.3 for i, shape in enumerate([(d, 3 * d), (d, d), (d, f), (f, d)], 1))
    g1, b1 = _rand(d, seed=7), _rand(d, seed=8)
    ref = {}
    ref["qkv"] = x @ wqkv
    for i, name in enumerate("qkv"):
        ref[name] = ref["qkv"][..., i * d:(i + 1) * d]
        ref[name + "4"] = ref[name].reshape(1, s, h, hd)
        ref[name + "t"] = ref[name + "4"].transpose(0, 2, 1, 3)
    ref["kT"] = ref["kt"].transpose(0, 1, 3, 2)
    ref["scores"] = ref["qt"] @ ref["kT"]
    ref["scaled"] = ref["scores"] * np.float32(1 / np.sqrt(hd))
    e = np.exp(ref["scaled"] - ref["scaled"].max(-1, keepdims=True))
    ref["probs"] = e / e.sum(-1, keepdims=True)
    ref["ctx"] = ref["probs"] @ ref["vt"]
    ref["ctx_t"] = ref["ctx"].transpose(0, 2, 1, 3)
    ref["ctx2"] = ref["ctx_t"].reshape(1, s, d)
    ref["attn"] = ref["ctx2"] @ wo
    ref["res"] = ref["attn"] + x
    mu, var = ref["res"].mean(-1, keepdims=True), ref["res"].var(-1, keepdims=True)
    ref["ln"] = (ref["res"] - mu) / np.sqrt(var + 1e-12) * g1 + b1
    ref["ff1"] = ref["ln"] @ w1
    ref["act"] = 0.5 * ref["ff1"] * (1 + sp.erf(ref["ff1"] / np.sqrt(2)))
    ref["ff2"] = ref["act"] @ w2
    ref["out"] = ref["ff2"] + ref["ln"]
    ref = {k: np.ascontiguousarray(v, np.float32) for k, v in ref.items()}
    nodes = [("Linear", ["x", "wqkv"], ["qkv"], {})]
    for i, name in enumerate("qkv"):
        nodes += [("Slice", ["qkv"], [name], {"starts": (i * d,), "ends": ((i + 1) * d,), "axes": (2,)}),
                  ("Reshape", [name], [name + "4"], {"shape": (1, s, h, hd)}),
                  ("Transpose", [name + "4"], [name + "t"], {"perm": (0, 2, 1, 3)})]
    nodes += [("Transpose", ["kt"], ["kT"], {"perm": (0, 1, 3, 2)}),
              ("MatMul", ["qt", "kT"], ["scores"], {}), ("Mul", ["scores", "scale"], ["scaled"], {}),
              ("Softmax", ["scaled"], ["probs"], {"axis": -1}), ("MatMul", ["probs", "vt"], ["ctx"], {}),
              ("Transpose", ["ctx"], ["ctx_t"], {"perm": (0, 2, 1, 3)}),
              ("Reshape", ["ctx_t"], ["ctx2"], {"shape": (1, s, d)}), ("Linear", ["ctx2", "wo"], ["attn"], {}),
              ("Add", ["attn", "x"], ["res"], {}),
              ("LayerNorm", ["res", "g1", "b1"], ["ln"], {"axis": -1, "epsilon": 1e-12}),
              ("Linear", ["ln", "w1"], ["ff1"], {}), ("Gelu", ["ff1"], ["act"], {}),
              ("Linear", ["act", "w2"], ["ff2"], {}), ("Add", ["ff2", "ln"], ["out"], {})]
    consts = {"wqkv": wqkv, "wo": wo, "w1": w1, "w2": w2, "g1": g1, "b1": b1,
              "scale": np.array(1 / np.sqrt(hd), np.float32)}
    _compile_run(tmp_path, nodes, {"x": x}, consts, ref, ["out", "probs"], rtol=1e-4, atol=1e-4)


def _tiny_graph(op, attrs):
    g = Graph("bad", ["x"], ["y"], [], {}, {})
    g.add_value("x", TensorType((2, 2), "float32"))
    g.add_value("y", TensorType((2, 2), "float32"))
    g.nodes.append(Node(op, "the_node", ["x"], ["y"], attrs))
    return g


@pytest.mark.parametrize("op,attrs,match", [
    ("FancyOp", {}, "FancyOp.*the_node"),
    ("Softmax", {"axis": -1, "stash": 1}, "Softmax.*the_node.*stash"),
    ("Gelu", {"approximate": "sigmoid"}, "Gelu.*the_node.*approximate"),
])
def test_unsupported_is_reported(op, attrs, match):
    from qcompile.backends.llvm import host_target
    from qcompile.backends.relax_lowering import lower_graph

    with pytest.raises(UnsupportedOpError, match=match):
        lower_graph(_tiny_graph(op, attrs), host_target())


@pytest.mark.slow
def test_minilm_fp32_matches_onnxruntime(tmp_path, minilm_onnx, minilm_feeds):
    """The real all-MiniLM-L6-v2 (batch 32, seq 128): max|a-b| / max|b| <= 1e-4 vs onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    from qcompile.backends import llvm
    from qcompile.backends.runtime import HostModule
    from qcompile.frontends.onnx_frontend import load_onnx

    graph = load_onnx(minilm_onnx, shapes={name: arr.shape for name, arr in minilm_feeds.items()})
    path = tmp_path / "model.so"
    llvm.export_library(llvm.build(graph), path)
    got = HostModule(path, graph.inputs, graph.outputs)(minilm_feeds)[graph.outputs[0]]
    ref = ort.InferenceSession(str(minilm_onnx), providers=["CPUExecutionProvider"]).run(None, minilm_feeds)[0]
    rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert rel <= 1e-4, rel


def test_host_module_threads_and_profile(tmp_path):
    """num_threads sizes TVM's pool both ways after it started; profile() lists the kernels."""
    import os

    import tvm

    from qcompile.backends.runtime import HostModule

    x = _rand(64, 256)
    path = _compile_run(tmp_path, [("Relu", ["x"], ["y"], {})], {"x": x}, {}, {"y": np.maximum(x, 0)}, ["y"])
    num_threads = tvm.get_global_func("runtime.NumThreads")
    for want in (1, min(2, os.cpu_count() or 1)):
        module = HostModule(path, ["x"], ["y"], num_threads=want)
        np.testing.assert_array_equal(module({"x": x})["y"], np.maximum(x, 0))
        assert num_threads() == want
    rows = module.profile({"x": x}, repeat=2)
    assert any(r["calls"] == 1 and r["best_ms"] >= 0 for r in rows if "relu" in r["kernel"]), rows
