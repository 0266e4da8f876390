"""Scheduled linear-algebra kernels (backends/kernels.py) against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from qcompile import quant
from qcompile.backends import kernels as K
from qcompile.schedules import llvm as sched_llvm

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                          "num-cores": 2})
GENERIC = tvm.target.Target({"kind": "llvm"})
RTOL, ATOL = 1e-4, 1e-4


def _build(func, target=HOST):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=target).mod


def _run(func, inputs, out_shape, target=HOST):
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    _build(func, target)["main"](*[tvm.runtime.tensor(a) for a in inputs], out)
    return out.numpy()


def _quantized(rng, rows, cols, bits, group_size, symmetric):
    """Random packed codes [rows, cols] + scales/zeros per group along cols."""
    groups = cols // group_size if group_size else 1
    codes = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    packed = quant.pack_codes(codes, bits)
    scales = (rng.random((rows, groups), dtype=np.float32) * 0.1 + 0.01).astype(np.float32)
    zeros = None if symmetric else rng.integers(0, 1 << bits, (rows, groups)).astype(np.float32)
    return packed, scales, zeros


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("m,k,n", [(1, 16, 16), (7, 33, 48), (13, 64, 96), (128, 96, 48),
                                   (5, 17, 3), (8, 8, 100)])
@pytest.mark.parametrize("has_bias", [False, True])
def test_linear(m, k, n, has_bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    inputs = [x, w] + ([b] if has_bias else [])
    got = _run(K.linear_kernel(m, k, n, has_bias, HOST), inputs, (m, n))
    _close(got, x @ w + (b if has_bias else 0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m,k,n,group_size,has_bias", [
    (1, 64, 48, 32, False), (7, 64, 96, 16, True), (16, 24, 32, 0, True), (3, 40, 20, 8, False)])
def test_qlinear(bits, symmetric, m, k, n, group_size, has_bias):
    rng = np.random.default_rng(bits * 10 + symmetric)
    packed, scales, zeros = _quantized(rng, n, k, bits, group_size, symmetric)
    x = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    w = quant.dequantize_weight(packed, scales, zeros, bits, group_size, k)
    inputs = [x, packed, scales] + ([zeros] if zeros is not None else []) + ([b] if has_bias else [])
    func = K.qlinear_kernel(m, k, n, bits, group_size, symmetric, has_bias, HOST)
    _close(_run(func, inputs, (m, n)), x @ w + (b if has_bias else 0))


@pytest.mark.parametrize("batch,m,k,n", [(2, 8, 4, 32), (3, 7, 5, 16), (2, 16, 32, 48),
                                         (1, 3, 3, 5)])
def test_batch_matmul(batch, m, k, n):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((batch, m, k), dtype=np.float32)
    b = rng.standard_normal((batch, k, n), dtype=np.float32)
    _close(_run(K.batch_matmul_kernel(batch, m, k, n, HOST), [a, b], (batch, m, n)), a @ b)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_qgather(bits, symmetric):
    rng = np.random.default_rng(2)
    v, d, group_size = 50, 40, 8
    packed, scales, zeros = _quantized(rng, v, d, bits, group_size, symmetric)
    table = quant.dequantize_weight(packed, scales, zeros, bits, group_size, d).T  # [v, d]
    idx = np.array([0, 49, 3, -1, 7, 7], np.int64)
    inputs = [packed, scales] + ([zeros] if zeros is not None else []) + [idx]
    got = _run(K.qgather_kernel(v, d, len(idx), bits, group_size, symmetric, HOST), inputs,
               (len(idx), d))
    np.testing.assert_array_equal(got, table[idx])


def test_generic_target_linear_and_qlinear():
    """A target without AVX-512 (plain llvm) gets a generic schedule that is still correct."""
    rng = np.random.default_rng(3)
    m, k, n = 9, 32, 24
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    _close(_run(K.linear_kernel(m, k, n, False, GENERIC), [x, w], (m, n), GENERIC), x @ w)
    packed, scales, zeros = _quantized(rng, n, k, 4, 16, False)
    wq = quant.dequantize_weight(packed, scales, zeros, 4, 16, k)
    func = K.qlinear_kernel(m, k, n, 4, 16, False, False, GENERIC)
    _close(_run(func, [x, packed, scales, zeros], (m, n), GENERIC), x @ wq)


def test_attributes_and_errors():
    func = K.linear_kernel(4, 8, 16, True, HOST)
    assert bool(func.attrs["tirx.is_scheduled"])
    assert "global_symbol" not in func.attrs
    with pytest.raises(ValueError, match="multiple of group_size"):
        K.qlinear_kernel(4, 40, 16, 4, 32, True, False, HOST)
    with pytest.raises(ValueError, match="bit width"):
        K.qlinear_kernel(4, 32, 16, 5, 32, True, False, HOST)
    with pytest.raises(ValueError, match="positive"):
        K.linear_kernel(0, 8, 16, False, HOST)


def test_cpu_params_by_target():
    assert sched_llvm.cpu_params(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})).lanes == 16
    assert sched_llvm.cpu_params(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})).lanes == 8
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert sched_llvm.cpu_params(arm).lanes == 4


@pytest.mark.skipif(not tvm.target.codegen.target_has_features(["avx512f"], HOST),
                    reason="host has no AVX-512")
def test_avx512_fma_in_asm():
    """The host GEMM and qlinear kernels use zmm FMAs (the register tile got vectorized)."""
    for func in (K.linear_kernel(32, 64, 96, True, HOST),
                 K.qlinear_kernel(32, 64, 96, 4, 32, False, True, HOST)):
        asm = _build(func).inspect_source("asm")
        assert "vfmadd231ps\t%zmm" in asm or "vfmadd231ps %zmm" in asm


def test_call_tir_in_relax_module():
    """The kernels drop into a Relax function via call_tir and survive tvm.compile's pipeline."""
    from tvm import relax

    m, k, n, bits, gs = 4, 64, 32, 4, 32
    rng = np.random.default_rng(4)
    packed, scales, _ = _quantized(rng, n, k, bits, gs, True)
    x = rng.standard_normal((m, k), dtype=np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((m, k), "float32"))
    with bb.function("main", [xv]):
        gv = bb.add_func(K.qlinear_kernel(m, k, n, bits, gs, True, False, HOST), "qlinear0")
        out = bb.emit(relax.call_tir(gv, [xv, relax.const(packed), relax.const(scales)],
                                     relax.TensorType((m, n), "float32")))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=HOST), tvm.cpu())
    want = x @ quant.dequantize_weight(packed, scales, None, bits, gs, k)
    _close(vm["main"](tvm.runtime.tensor(x)).numpy(), want)
