"""Float LayerNorm / Softmax / Erf reproduce onnxruntime's CPU kernels bit for bit.

The reference kernels are :mod:`qcompile.mlas_float` (interpreter); the compiled ones are
:mod:`qcompile.backends.mlas_float_kernels`. onnxruntime 1.32 picks its kernels by CPU feature
(the AVX-512F softmax, the FMA3 erf, the AVX2 LayerNorm); on an x86 CPU without AVX-512F the
comparisons against onnxruntime are skipped, the interpreter-vs-compiled ones still run.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from qcompile import mlas_float
from qcompile.backends import mlas_float_kernels
from qcompile.backends.llvm.target import host_target

RNG = np.random.default_rng(7)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


needs_ort_x86_kernels = pytest.mark.skipif(
    not {"avx512f", "avx2", "fma"} <= _cpu_flags(),
    reason="onnxruntime's MLAS picks other kernels (other rounding) without AVX-512F / AVX2 / FMA")


def _ort(nodes, inputs: dict[str, np.ndarray], initializers=(), n_outputs=1):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inputs.items()],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(n_outputs)],
        [numpy_helper.from_array(v, k) for k, v in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, inputs)


def _rows(rows: int, n: int) -> np.ndarray:
    """Rows of mixed scale and offset (LayerNorm's mean and variance both matter)."""
    x = RNG.standard_normal((rows, n)) * RNG.uniform(0.01, 30, (rows, 1)) + RNG.standard_normal((rows, 1)) * 20
    return x.astype(np.float32)


def _build(func):
    return tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=host_target())


def _run_tir(func, *arrays, out_shape):
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    _build(func)(*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


# ---------------------------------------------------------------------------- against onnxruntime
@needs_ort_x86_kernels
@pytest.mark.parametrize("n", [3, 7, 8, 9, 15, 64, 100, 101, 384, 768])
def test_layer_norm_matches_onnxruntime(n):
    x = _rows(200, n)
    gamma = (1 + 0.3 * RNG.standard_normal(n)).astype(np.float32)
    beta = (0.3 * RNG.standard_normal(n)).astype(np.float32)
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y0"], axis=-1, epsilon=1e-12)
    (want,) = _ort([node], {"x": x}, [("g", gamma), ("b", beta)])
    np.testing.assert_array_equal(mlas_float.layer_norm(x, gamma, beta, 1e-12, -1), want)


@needs_ort_x86_kernels
def test_layer_norm_over_two_axes_matches_onnxruntime():
    x = _rows(64, 48).reshape(8, 8, 6, 8)
    gamma = RNG.standard_normal((6, 8)).astype(np.float32)
    node = helper.make_node("LayerNormalization", ["x", "g"], ["y0"], axis=2, epsilon=1e-5)
    (want,) = _ort([node], {"x": x}, [("g", gamma)])
    np.testing.assert_array_equal(mlas_float.layer_norm(x, gamma, None, 1e-5, 2), want)


@needs_ort_x86_kernels
@pytest.mark.parametrize("n", [1, 5, 16, 17, 48, 50, 128, 333])
def test_softmax_matches_onnxruntime(n):
    x = (RNG.standard_normal((150, n)) * RNG.uniform(0.1, 20, (150, 1))).astype(np.float32)
    x[::7, ::3] = -10000.0  # attention-mask style entries: exp underflows to 0
    (want,) = _ort([helper.make_node("Softmax", ["x"], ["y0"], axis=-1)], {"x": x})
    np.testing.assert_array_equal(mlas_float.softmax(x), want)


@needs_ort_x86_kernels
def test_softmax_on_a_middle_axis_matches_onnxruntime():
    x = RNG.standard_normal((3, 20, 7)).astype(np.float32) * 5
    (want,) = _ort([helper.make_node("Softmax", ["x"], ["y0"], axis=1)], {"x": x})
    np.testing.assert_array_equal(mlas_float.softmax(x, axis=1), want)


@needs_ort_x86_kernels
def test_erf_matches_onnxruntime():
    edges = [0.0, -0.0, 0.921875, -0.921875, np.nextafter(np.float32(0.921875), np.float32(0)), 3.725, 3.925, 4.0,
             -4.0, 10.0, -10.0, 1e-30, -1e-30, 1e-3]
    x = np.concatenate([RNG.standard_normal(50000) * 2, RNG.uniform(-6, 6, 20000), edges]).astype(np.float32)
    (want,) = _ort([helper.make_node("Erf", ["x"], ["y0"])], {"x": x})
    got = mlas_float.erf(x)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))  # -0.0 stays -0.0


# ---------------------------------------------------------------------------- compiled == interpreter
@pytest.mark.parametrize("n", [8, 15, 20, 384])
def test_layer_norm_kernel_equals_interpreter(n):
    x = _rows(33, n)
    gamma = RNG.standard_normal(n).astype(np.float32)
    beta = RNG.standard_normal(n).astype(np.float32)
    got = _run_tir(mlas_float_kernels.layer_norm_kernel(33, n, 1e-5), x, gamma, beta, out_shape=x.shape)
    np.testing.assert_array_equal(got, mlas_float.layer_norm(x, gamma, beta, 1e-5, -1))


def test_layer_norm_kernel_refuses_short_rows():
    with pytest.raises(ValueError, match="at least 8"):
        mlas_float_kernels.layer_norm_kernel(4, 7, 1e-5)


@pytest.mark.parametrize("n", [1, 16, 33, 128])
def test_softmax_kernel_equals_interpreter(n):
    x = (RNG.standard_normal((40, n)) * 8).astype(np.float32)
    x[::5, ::3] = -10000.0
    got = _run_tir(mlas_float_kernels.softmax_kernel(40, n), x, out_shape=x.shape)
    np.testing.assert_array_equal(got, mlas_float.softmax(x))


def test_erf_compute_equals_interpreter():
    x = np.concatenate([RNG.standard_normal(4000) * 2, [0.0, -0.0, 0.921875, 3.925, -5.0]]).astype(np.float32)
    xt = tvm.te.placeholder(x.shape, "float32", name="x")
    func = tvm.te.create_prim_func([xt, mlas_float_kernels.erf_compute(xt)])
    got = _run_tir(func, x, out_shape=x.shape)
    np.testing.assert_array_equal(got.view(np.int32), mlas_float.erf(x).view(np.int32))


def test_compiled_mul_then_add_rounds_the_product(tmp_path):
    """``Mul -> Add`` compiles to two roundings (as onnxruntime and the interpreter), not one fma."""
    import qcompile
    import onnx

    x = RNG.standard_normal((64, 256)).astype(np.float32)
    s = RNG.standard_normal((1, 256)).astype(np.float32)
    b = RNG.standard_normal((1, 256)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "s"], ["p"]), helper.make_node("Add", ["p", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 256])],
                              [numpy_helper.from_array(s, "s"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    qcompile.compile(str(tmp_path / "m.onnx"), output=tmp_path / "out", verify=False)
    got = qcompile.load(tmp_path / "out").run({"x": x})["y"]
    separate = x * s + b
    assert not np.array_equal(separate, (x.astype(np.float64) * s + b).astype(np.float32))  # an fma would show
    np.testing.assert_array_equal(got, separate)
