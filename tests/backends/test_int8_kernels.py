"""Int8 kernels (QuantizeAct / Int8Linear) vs numpy references with int64 accumulation."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from qcompile.backends import int8_kernels as K
from qcompile.backends.llvm.target import host_target
from qcompile.interpreter_int8 import int8_linear, quantize_rows, quantize_static


@pytest.fixture(scope="module")
def target():
    return host_target(2)


def _run(func, arrays, out_shapes, target):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    outs = [tvm.runtime.tensor(np.zeros(s, d)) for s, d in out_shapes]
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], *outs)
    return [o.numpy() for o in outs], lib


def _rows(rng, m, k):
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.01, 30, (m, 1)).astype(np.float32)
    x[0, :5] = [0.5, -0.5, 1.5, 2.5, -2.5]  # exact ties once scaled by 127 / amax? kept anyway
    x[1] = 0.0  # all-zero row: amax floor
    # values that land exactly on .5 after scaling: amax = 127 -> inv = 1
    x[2] = np.linspace(-126.5, 126.5, k).astype(np.float32)
    x[2, 0] = 127.0
    return x


@pytest.mark.parametrize("m,k", [(8, 64), (5, 48), (3, 20)])
def test_quantize_rows_matches_reference(target, m, k):
    x = _rows(np.random.default_rng(0), m, k)
    (u, s), _ = _run(K.quantize_rows_kernel(m, k, target), [x], [((m, k), "uint8"), ((m, 1), "float32")], target)
    ru, rs = quantize_rows(x)
    np.testing.assert_array_equal(u, ru)
    np.testing.assert_array_equal(s, rs)


def test_four_bit_codes_match_reference_and_stay_in_range(target):
    """QuantizeAct bits=4 (W4A4): codes in [-7, 7] around the zero point 128, dynamic and static."""
    x = _rows(np.random.default_rng(3), 8, 64)
    (u, s), _ = _run(K.quantize_rows_kernel(8, 64, target, qmax=7), [x], [((8, 64), "uint8"), ((8, 1), "float32")],
                     target)
    ru, rs = quantize_rows(x, 7)
    np.testing.assert_array_equal(u, ru)
    np.testing.assert_array_equal(s, rs)
    assert u.min() >= 121 and u.max() <= 135 and {121, 135} <= set(np.unique(u).tolist())
    np.testing.assert_allclose((ru.astype(np.float32) - 128) * rs, x, atol=float(rs.max()) / 2 * 1.0001)
    (us,), _ = _run(K.quantize_static_kernel(8, 64, 0.5, target, qmax=7), [x], [((8, 64), "uint8")], target)
    np.testing.assert_array_equal(us, quantize_static(x, 0.5, 7)[0])
    assert us.min() == 121 and us.max() == 135  # |x| / 0.5 exceeds 7: saturated both ways


def test_round_half_even_in_codes(target):
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]], np.float32)
    (u, _), _ = _run(K.quantize_rows_kernel(1, 8, target), [x], [((1, 8), "uint8"), ((1, 1), "float32")], target)
    assert (u.astype(int) - 128).tolist() == [[127, 0, 2, 2, 0, -2, -2, 4]]


def test_quantize_static_matches_reference(target):
    x = _rows(np.random.default_rng(1), 6, 32)
    (u,), _ = _run(K.quantize_static_kernel(6, 32, 0.05, target), [x], [((6, 32), "uint8")], target)
    np.testing.assert_array_equal(u, quantize_static(x, 0.05)[0])


def _linear_case(rng, m, k, n, wbits=8):
    qmax = 2 ** (wbits - 1) - 1
    u = rng.integers(1, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-qmax, qmax + 1, (k, n)).astype(np.int8)
    xs = rng.uniform(0.001, 0.1, (m, 1)).astype(np.float32)
    ws = rng.uniform(0.001, 0.1, n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    return u, w, xs, ws, b


@pytest.mark.parametrize("m,k,n,vnni", [(16, 64, 48, True), (7, 32, 32, True), (9, 24, 10, False), (16, 64, 48, False)])
def test_int8_linear_matches_int64_reference(target, m, k, n, vnni):
    if vnni and not K.vnni_supported(target):
        pytest.skip("no AVX-512 VNNI on this host")
    u, w, xs, ws, b = _linear_case(np.random.default_rng(2), m, k, n)
    corr = (128 * w.astype(np.int64).sum(0)).astype(np.int32)
    wt = K.pack_vnni(w) if vnni else w
    (y,), lib = _run(K.int8_linear_kernel(m, k, n, True, True, vnni, target), [u, xs, wt, ws, corr, b],
                     [((m, n), "float32")], target)
    acc = (u.astype(np.int64) - 128) @ w.astype(np.int64)  # exact
    ref = int8_linear(u, xs, w, ws, b)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())
    # the integer part is exact: undo the float rescale where it is exactly invertible
    recovered = np.rint((y - b) / (xs * ws)).astype(np.int64)
    assert np.abs(recovered - acc).max() <= np.abs(acc).max() * 1e-6 + 1
    if vnni:
        assert "vpdpbusd" in lib.mod.inspect_source("asm")


def test_static_scale_kernel_and_pack_layout(target):
    w = np.arange(8 * 32, dtype=np.int64).reshape(8, 32).astype(np.int8)
    p = K.pack_vnni(w)
    assert p.shape == (2, 2, 16, 4)
    assert p[1, 1, 3, 2] == w[1 * 4 + 2, 1 * 16 + 3]
    u, w, xs, ws, b = _linear_case(np.random.default_rng(3), 4, 8, 32)
    xs1 = np.full((1, 1), 0.02, np.float32)
    corr = (128 * w.astype(np.int64).sum(0)).astype(np.int32)
    vnni = K.vnni_supported(target)
    (y,), _ = _run(K.int8_linear_kernel(4, 8, 32, False, False, vnni, target),
                   [u, xs1, K.pack_vnni(w) if vnni else w, ws, corr], [((4, 32), "float32")], target)
    np.testing.assert_allclose(y, int8_linear(u, xs1, w, ws), rtol=1e-5, atol=1e-5)


def test_quantize_rows_codegen_is_vector(target):
    """The codes loop stays one vector loop: rounding is a vector round (not a scalarized
    ``nearbyint`` that LLVM re-vectorizes across rows with gathers)."""
    if not K.vnni_supported(target):
        pytest.skip("host has no AVX-512")
    _, lib = _run(K.quantize_rows_kernel(8, 64, target), [np.ones((8, 64), np.float32)],
                  [((8, 64), "uint8"), ((8, 1), "float32")], target)
    asm = lib.mod.inspect_source("asm")
    assert "vrndscaleps" in asm and "vgather" not in asm
