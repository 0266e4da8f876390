"""Integer GEMM epilogue fusion (backends/int_epilogue.py) and the VNNI batched GEMM
(backends/int_batch_gemm.py): which chains fuse, and bit-exactness with the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from qcompile.backends import int_epilogue, kernels
from qcompile.backends.int8_kernels import vnni_supported
from qcompile.backends.llvm.target import host_target
from qcompile.interpreter import run
from qcompile.interpreter_integer import dyadic
from qcompile.interpreter_integer_nn import int_matmul
from qcompile.ir import Graph, Node, TensorType, verify

M, K, N = 16, 64, 32


@pytest.fixture(scope="module")
def target():
    return host_target(2)


def _graph(nodes, outputs, types, consts):
    """x uint8 [2, 8, K]; ``nodes`` = (op, inputs, output, attrs); ``types`` = output -> (shape, dtype)."""
    g = Graph("t", ["x"], list(outputs), [], {}, {})
    g.add_value("x", TensorType((2, 8, K), "uint8"))
    for name, arr in consts.items():
        g.add_constant(name, arr)
    for i, (op, ins, out, attrs) in enumerate(nodes):
        g.add_value(out, TensorType(*types[out]))
        g.nodes.append(Node(op, f"n{i}_{op}", list(ins), [out], dict(attrs)))
    verify(g)
    return g


def _consts(rng):
    m1, s1 = dyadic(rng.uniform(2e-4, 8e-4, N))
    m2, s2 = dyadic(rng.uniform(0.5, 2.0, 1))
    return {"w": rng.integers(-127, 128, (K, N)).astype(np.int8), "b": rng.integers(-4000, 4000, N).astype(np.int32),
            "m1": m1, "s1": s1, "m2": m2, "s2": s2, "t": rng.integers(-(1 << 20), 1 << 20, 256).astype(np.int32)}


RQ_CODES = {"axis": 2, "out_dtype": "uint8", "qmin": -127, "qmax": 127}
# IntLinear -> Requantize (codes, per channel) -> Lut (int32 table) -> Requantize (int32, per tensor)
CHAIN = [("IntLinear", ["x", "w", "b"], "acc", {"wbits": 8}),
         ("Requantize", ["acc", "m1", "s1"], "codes", RQ_CODES),
         ("Lut", ["codes", "t"], "table", {"offset": 0}),
         ("Requantize", ["table", "m2", "s2"], "y", {"axis": -1, "out_dtype": "int32"})]
TYPES = {"acc": ((2, 8, N), "int32"), "codes": ((2, 8, N), "uint8"), "table": ((2, 8, N), "int32"),
         "y": ((2, 8, N), "int32"), "y2": ((2, 8, N), "int32")}


def _chain_ops(g):
    return [n.op for n in int_epilogue.fusible_chain(g, "acc", g.consumers())]


def test_chain_follows_single_consumers_of_constant_parameter_ops():
    g = _graph(CHAIN, ["y"], TYPES, _consts(np.random.default_rng(0)))
    assert _chain_ops(g) == ["Requantize", "Lut", "Requantize"]


def test_chain_stops_at_a_shared_value_a_graph_output_and_another_axis():
    consts = _consts(np.random.default_rng(0))
    shared = CHAIN + [("Requantize", ["table", "m2", "s2"], "y2", {"axis": -1, "out_dtype": "int32"})]
    assert _chain_ops(_graph(shared, ["y", "y2"], TYPES, consts)) == ["Requantize", "Lut"]
    assert _chain_ops(_graph(CHAIN, ["codes", "y"], TYPES, consts)) == ["Requantize"]
    consts["m1"], consts["s1"] = dyadic(np.full(8, 1e-3))  # per channel along axis 1, not the GEMM's n
    other_axis = [CHAIN[0], ("Requantize", ["acc", "m1", "s1"], "codes", dict(RQ_CODES, axis=1))]
    assert _chain_ops(_graph(other_axis, ["codes"], TYPES, consts)) == []


def test_fused_chain_is_bit_exact_and_leaves_no_separate_kernel(tmp_path, target):
    from qcompile.backends import llvm
    from qcompile.backends.llvm.target import relax_pipeline
    from qcompile.backends.relax_lowering import lower_graph
    from qcompile.backends.runtime import HostModule

    rng = np.random.default_rng(1)
    g = _graph(CHAIN, ["y"], TYPES, _consts(rng))
    mod = relax_pipeline(target)(lower_graph(g, target))
    names = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert not [n for n in names if "requantize" in n or "lut" in n], names
    llvm.export_library(llvm.build(g), tmp_path / "model.so")
    x = rng.integers(0, 256, (2, 8, K)).astype(np.uint8)
    got = HostModule(tmp_path / "model.so", g.inputs, g.outputs, num_threads=2)({"x": x})["y"]
    np.testing.assert_array_equal(got, run(g, {"x": x})["y"])


BATCH_CASES = [  # (a dtype, b dtype, a_zero, b_zero, m, k, n): attention Q K^T on codes, then other zeros
    ("uint8", "uint8", 128, 128, 24, 32, 48), ("uint8", "int8", 0, 0, 5, 16, 16), ("uint8", "uint8", 3, 128, 8, 8, 32)]


@pytest.mark.parametrize("a_dtype,b_dtype,a_zero,b_zero,m,k,n", BATCH_CASES)
def test_vnni_batch_matmul_matches_reference(target, a_dtype, b_dtype, a_zero, b_zero, m, k, n):
    from qcompile.backends import int_batch_gemm

    if not vnni_supported(target):
        pytest.skip("host has no AVX-512 VNNI")
    assert int_batch_gemm.applies(target, k, n, a_dtype, b_dtype, b_zero)
    _check_batch_matmul(target, 3, m, k, n, a_dtype, b_dtype, a_zero, b_zero)


def test_int32_by_codes_batch_matmul_matches_reference(target):
    """Probabilities (int32, up to 2**15) times V codes: the widened kernel, B widened per panel."""
    _check_batch_matmul(target, 3, 16, 32, 16, "int32", "uint8", 0, 128)


def _check_batch_matmul(target, batch, m, k, n, a_dtype, b_dtype, a_zero, b_zero):
    rng = np.random.default_rng(2)
    hi = {"uint8": 256, "int8": 128, "int32": (1 << 15) + 1}
    a = rng.integers(0, hi[a_dtype], (batch, m, k)).astype(a_dtype)
    b = rng.integers(-127 if b_dtype == "int8" else 0, hi[b_dtype], (batch, k, n)).astype(b_dtype)
    a.flat[0], b.flat[0] = hi[a_dtype] - 1, hi[b_dtype] - 1  # extremes
    func = kernels.int_batch_matmul_kernel(batch, m, k, n, a_dtype, b_dtype, a_zero, b_zero, target)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    out = tvm.runtime.tensor(np.zeros((batch, m, n), np.int32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    np.testing.assert_array_equal(out.numpy(), int_matmul(a, b, a_zero, b_zero))
