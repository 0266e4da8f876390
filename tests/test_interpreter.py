"""Reference interpreter: feed validation, coverage of the op set, quantized ops, edge semantics."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.errors import InputError, InvariantError, UnsupportedOpError
from qcompile.interpreter import KERNELS, run
from qcompile.ir import Graph, Node, QuantSpec, TensorType, verify
from qcompile.ops import ALL_OPS
from qcompile.quant import pack_codes


def _graph(op, in_types, out_type, attrs=None, consts=None):
    """One-node graph: inputs x0, x1, ... (constants where ``consts`` gives arrays) -> y."""
    g = Graph("t", [], ["y"], [], {}, {})
    names = []
    for i, t in enumerate(in_types):
        name = f"x{i}"
        if consts and name in consts:
            g.add_constant(name, consts[name])
        elif t is None:
            name = ""
        else:
            g.add_value(name, t)
            g.inputs.append(name)
        names.append(name)
    g.add_value("y", out_type)
    g.nodes.append(Node(op, "n", names, ["y"], attrs or {}))
    verify(g)
    return g


def test_every_op_has_a_kernel():
    assert set(KERNELS) == set(ALL_OPS)


def test_feed_validation_names_the_input():
    g = _graph("Relu", [TensorType((2, 3), "float32")], TensorType((2, 3), "float32"))
    with pytest.raises(InputError, match="x0"):
        run(g, {})
    with pytest.raises(InputError, match="'x0' has shape"):
        run(g, {"x0": np.zeros((3, 2), np.float32)})
    with pytest.raises(InputError, match="'x0' has dtype"):
        run(g, {"x0": np.zeros((2, 3), np.float64)})


def test_unknown_op_raises_unsupported():
    g = _graph("Relu", [TensorType((2,), "float32")], TensorType((2,), "float32"))
    g.nodes[0].op = "Frobnicate"
    with pytest.raises(UnsupportedOpError, match="Frobnicate.*'n'"):
        run(g, {"x0": np.zeros(2, np.float32)})


def test_declared_type_mismatch_is_an_invariant_error():
    g = _graph("Relu", [TensorType((2,), "float32")], TensorType((3,), "float32"))
    with pytest.raises(InvariantError, match="declared"):
        run(g, {"x0": np.zeros(2, np.float32)})


def test_keep_all_returns_intermediates():
    g = _graph("Neg", [TensorType((2,), "float32")], TensorType((2,), "float32"))
    out = run(g, {"x0": np.ones(2, np.float32)}, keep_all=True)
    assert set(out) == {"x0", "y"} and out["y"].tolist() == [-1, -1]


def test_integer_div_truncates_like_onnx():
    t = TensorType((4,), "int64")
    g = _graph("Div", [t, t], t)
    out = run(g, {"x0": np.array([7, -7, 7, -7]), "x1": np.array([2, 2, -2, -2])})["y"]
    assert out.tolist() == [3, -3, -3, 3]


def test_slice_negative_step_reaches_index_zero():
    g = _graph("Slice", [TensorType((5,), "float32")], TensorType((3,), "float32"),
               {"starts": (4,), "ends": (-1,), "axes": (0,), "steps": (-2,)})
    assert run(g, {"x0": np.arange(5, dtype=np.float32)})["y"].tolist() == [4, 2, 0]


def test_float_math_stays_float32():
    t = TensorType((8,), "float32")
    for op in ("Erf", "Sigmoid", "Reciprocal", "Gelu"):
        g = _graph(op, [t], t)
        assert run(g, {"x0": np.linspace(-2, 2, 8, dtype=np.float32)})["y"].dtype == np.float32


def _quantize(w_kn, bits, group_size, symmetric):
    """Reference RTN quantization of W[K, N] -> (packed [N, *], scales [N, G], zeros [N, G] | None)."""
    k, n = w_kn.shape
    gs = group_size or k
    wg = w_kn.T.reshape(n, k // gs, gs)
    qmax = (1 << bits) - 1
    if symmetric:
        scales = np.abs(wg).max(-1) / (qmax // 2) + 1e-8
        zeros = np.full_like(scales, 1 << (bits - 1))
    else:
        lo, hi = wg.min(-1), wg.max(-1)
        scales = (hi - lo) / qmax + 1e-8
        zeros = np.round(-lo / scales)
    codes = np.clip(np.round(wg / scales[..., None] + zeros[..., None]), 0, qmax).astype(np.uint8).reshape(n, k)
    return pack_codes(codes, bits), scales.astype(np.float32), None if symmetric else zeros.astype(np.float32)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (8, 0, True), (3, 16, False), (2, 0, False)])
def test_qlinear_matches_linear_on_dequantized_weight(bits, group_size, symmetric):
    rng = np.random.default_rng(bits)
    k, n = 64, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed, scales, zeros = _quantize(w, bits, group_size, symmetric)
    bias = rng.standard_normal(n).astype(np.float32)
    g = Graph("q", ["x"], ["y"], [], {}, {})
    g.add_value("x", TensorType((3, k), "float32"))
    g.add_constant("qw", packed, QuantSpec(bits, symmetric, 0, group_size, (k, n)))
    g.add_constant("s", scales)
    if zeros is not None:
        g.add_constant("z", zeros)
    g.add_constant("b", bias)
    g.add_value("y", TensorType((3, n), "float32"))
    attrs = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    g.nodes.append(Node("QLinear", "ql", ["x", "qw", "s", "z" if zeros is not None else "", "b"], ["y"], attrs))
    verify(g)
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = run(g, {"x": x})["y"]
    gs = group_size or k
    zero = zeros if zeros is not None else np.full_like(scales, 1 << (bits - 1))
    codes = np.round(w.T.reshape(n, k // gs, gs) / scales[..., None] + zero[..., None]).clip(0, (1 << bits) - 1)
    w_hat = ((codes - zero[..., None]) * scales[..., None]).reshape(n, k).T
    np.testing.assert_allclose(got, x @ w_hat + bias, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(w_hat - w)) <= np.max(scales) * (0.51 if bits > 2 else 1.6)


def test_qgather_rows_are_quantized_along_d():
    rng = np.random.default_rng(7)
    v, d, bits, gs = 10, 32, 4, 16
    table = rng.standard_normal((v, d)).astype(np.float32)
    packed, scales, zeros = _quantize(table.T, bits, gs, False)  # rows = V, packed axis = D
    assert packed.shape == (v, d * bits // 8) and scales.shape == (v, d // gs)
    g = Graph("g", ["ids"], ["y"], [], {}, {})
    g.add_value("ids", TensorType((2, 3), "int64"))
    g.add_constant("qt", packed, QuantSpec(bits, False, 1, gs, (v, d)))
    g.add_constant("s", scales)
    g.add_constant("z", zeros)
    g.add_value("y", TensorType((2, 3, d), "float32"))
    g.nodes.append(Node("QGather", "qg", ["qt", "s", "z", "ids"], ["y"], {"bits": bits, "group_size": gs, "symmetric": False}))
    verify(g)
    ids = np.array([[0, 9, 3], [3, 3, 1]])
    got = run(g, {"ids": ids})["y"]
    assert np.max(np.abs(got - table[ids])) <= np.max(scales) * 0.51
