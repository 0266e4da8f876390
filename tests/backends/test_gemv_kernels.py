"""Decode GEMV kernels (backends/gemv_kernels.py) against numpy references; no timing."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from qcompile import quant
from qcompile.backends import gemv_kernels as GK
from qcompile.backends import kernels as K

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                          "num-cores": 2})
VNNI = GK.has_vnni(HOST)


def _run(func, inputs, out_shape):
    mod = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    mod.mod["main"](*[tvm.runtime.tensor(a) for a in inputs], out)
    return out.numpy()


def _case(seed, m, k, n, bits, group_size, symmetric):
    rng = np.random.default_rng(seed)
    groups = k // group_size if group_size else 1
    packed = quant.pack_codes(rng.integers(0, 1 << bits, (n, k), dtype=np.uint8), bits)
    scales = (rng.random((n, groups), dtype=np.float32) * 0.1 + 0.01).astype(np.float32)
    zeros = None if symmetric else rng.integers(0, 1 << bits, (n, groups)).astype(np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    return x, packed, scales, zeros, bias


def _inputs(x, packed, scales, zeros, bias, has_bias):
    return [x, packed, scales] + ([zeros] if zeros is not None else []) + ([bias] if has_bias else [])


def _close(got, want, rtol=1e-4):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, np.abs(want).max()))


def _int8_reference(x, w, block):
    """x quantized per block of ``block`` codes (symmetric int8, round half away from zero)."""
    m, k = x.shape
    xb = x.reshape(m, k // block, block).astype(np.float64)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    scale = amax / 127.0
    inv = np.where(amax > 0, 127.0 / np.where(amax > 0, amax, 1), 0)
    q = np.sign(xb * inv) * np.floor(np.abs(xb * inv) + 0.5)
    return ((q * scale).reshape(m, k) @ w.astype(np.float64)).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m,k,n,group_size,has_bias", [
    (1, 256, 37, 32, True), (2, 128, 64, 0, False), (3, 256, 33, 128, True), (1, 64, 1, 16, False)])
def test_qgemv_float(bits, symmetric, m, k, n, group_size, has_bias):
    x, packed, scales, zeros, bias = _case(bits * 7 + m, m, k, n, bits, group_size, symmetric)
    assert GK.gemv_variant(m, k, n, bits, group_size, HOST) == "float"
    func = GK.qgemv_kernel(m, k, n, bits, group_size, symmetric, has_bias, HOST)
    w = quant.dequantize_weight(packed, scales, zeros, bits, group_size, k)
    got = _run(func, _inputs(x, packed, scales, zeros, bias, has_bias), (m, n))
    _close(got, x @ w + (bias if has_bias else 0))


@pytest.mark.skipif(not VNNI, reason="host has no AVX-512 VNNI")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m,k,n,group_size", [(1, 512, 37, 128), (2, 256, 64, 0), (3, 256, 40, 64)])
def test_qgemv_int8_activations(bits, symmetric, m, k, n, group_size):
    x, packed, scales, zeros, bias = _case(bits * 11 + m, m, k, n, bits, group_size, symmetric)
    assert GK.gemv_variant(m, k, n, bits, group_size, HOST, act_int8=True) == "int8"
    func = GK.qgemv_kernel(m, k, n, bits, group_size, symmetric, True, HOST, act_int8=True)
    w = quant.dequantize_weight(packed, scales, zeros, bits, group_size, k)
    _, block = GK._int8_plan(k, group_size or k, bits)  # pylint: disable=protected-access
    got = _run(func, _inputs(x, packed, scales, zeros, bias, True), (m, n))
    _close(got, _int8_reference(x, w, block) + bias, rtol=2e-4)
    _close(got, x @ w + bias, rtol=3e-2)  # and close to the exact product


def test_qgemv_vpdpbusd_in_asm():
    if not VNNI:
        pytest.skip("host has no AVX-512 VNNI")
    func = GK.qgemv_kernel(1, 512, 64, 4, 128, False, False, HOST, act_int8=True)
    mod = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    assert "vpdpbusd" in mod.mod.inspect_source("asm")


@pytest.mark.parametrize("m,bits,group_size", [(1, 4, 32), (4, 3, 0), (5, 4, 32)])
def test_qlinear_kernel_dispatch(m, bits, group_size):
    """qlinear_kernel returns the GEMV for m <= GEMV_MAX_M, the GEMM above; both correct."""
    k, n = 64, 48
    x, packed, scales, zeros, bias = _case(m, m, k, n, bits, group_size, False)
    func = K.qlinear_kernel(m, k, n, bits, group_size, False, True, HOST)
    is_gemv = "dequant" not in func.script()
    assert is_gemv == (m <= GK.GEMV_MAX_M)
    w = quant.dequantize_weight(packed, scales, zeros, bits, group_size, k)
    _close(_run(func, _inputs(x, packed, scales, zeros, bias, True), (m, n)), x @ w + bias)


def test_no_variant_for_odd_k():
    """k not a multiple of the codes per unit: no GEMV; qlinear_kernel keeps the GEMM."""
    assert GK.gemv_variant(1, 20, 16, 3, 0, HOST) is None
    with pytest.raises(ValueError, match="no GEMV variant"):
        GK.qgemv_kernel(1, 20, 16, 3, 0, True, False, HOST)
    x, packed, scales, zeros, bias = _case(0, 1, 20, 16, 3, 0, True)
    w = quant.dequantize_weight(packed, scales, zeros, 3, 0, 20)
    _close(_run(K.qlinear_kernel(1, 20, 16, 3, 0, True, False, HOST), [x, packed, scales], (1, 16)), x @ w)


@pytest.mark.parametrize("m,n,has_bias", [(1, 1024, True), (3, 1056, False)])
def test_fp32_gemv(m, n, has_bias):
    k = 1024
    assert GK.use_fp32_gemv(m, k, n, HOST)
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    func = K.linear_kernel(m, k, n, has_bias, HOST)
    got = _run(func, [x, w] + ([b] if has_bias else []), (m, n))
    _close(got, x @ w + (b if has_bias else 0))
