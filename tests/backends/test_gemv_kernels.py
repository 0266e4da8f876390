"""Decode GEMV kernels (backends/gemv_kernels.py, backends/gemv_vnni.py) against numpy references; no timing."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from qcompile import quant
from qcompile.backends import gemv_kernels as GK
from qcompile.backends import gemv_vnni as GV
from qcompile.backends import kernels as K

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                          "num-cores": 2})
VNNI = GV.has_vnni(HOST)
needs_vnni = pytest.mark.skipif(not VNNI, reason="host has no AVX-512 VNNI")


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


# ---------------------------------------------------------------------------- VNNI GEMV (m = 1)
def _compile(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)


def _vnni_run(k, n, bits, group_size, symmetric, has_bias, x=None, seed=0):
    """(kernel output, numpy model output, exact f32 GEMV) for one random case."""
    xr, packed, scales, zeros, bias = _case(seed, 1, k, n, bits, group_size, symmetric)
    x = xr if x is None else x
    bias = bias if has_bias else None
    arrays = GV.vnni_arrays(GV.pack_vnni_weights(packed, scales, zeros, bits, k), bias)
    func = GV.vnni_gemv_kernel(k, n, bits, group_size, symmetric, has_bias, HOST)
    got = _run(func, [x, *arrays], (1, n))
    want = GV.vnni_gemv_reference(x, packed, scales, zeros, bits, group_size, bias)
    exact = x @ quant.dequantize_weight(packed, scales, zeros, bits, group_size, k) + (0 if bias is None else bias)
    return got, want, exact


@needs_vnni
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,n,group_size,has_bias", [
    (512, 96, 128, True),  # 4 groups, 2 row vectors per step
    (256, 64, 0, False),  # one group = one activation block of 256
    (1024, 48, 512, True),  # groups longer than 256: 2 activation blocks per group
    (512, 128, 32, False)])  # 16 groups, 4 row vectors per step, 2 parallel tasks
def test_vnni_gemv_matches_int8_model(bits, symmetric, k, n, group_size, has_bias):
    """Integer parts exact: only f32 summation order differs from the numpy model."""
    got, want, exact = _vnni_run(k, n, bits, group_size, symmetric, has_bias, seed=bits * 13 + k)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    _close(got, exact, rtol=3e-2)  # int8 activation rounding only
    assert np.abs(got - exact).max() > 0  # the activations really were rounded


@needs_vnni
def test_vnni_zero_activation_block():
    """A block of zeros quantizes to zeros (scale 0, no 0/0) and contributes nothing."""
    x = np.random.default_rng(3).standard_normal((1, 512), dtype=np.float32)
    x[0, 128:256] = 0
    got, want, _ = _vnni_run(512, 64, 4, 128, False, True, x=x)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_vnni_activation_quantization_model():
    x = np.array([0.5, -1.0, 0.25, 0.0] * 4 + [0.0] * 16, np.float32)
    xq, xs = GV.quantize_activations(x, 16)
    np.testing.assert_array_equal(xq[:4], [64, -127, 32, 0])  # rint(63.5) = 64 (half to even)
    np.testing.assert_array_equal(xq[16:], 0)
    np.testing.assert_allclose(xs, [1 / 127, 0])


@pytest.mark.parametrize("bits", [2, 4])
def test_vnni_layout(bits):
    """codes[r, (h*R + v)*4 + j] holds, in bit field e, the code of row r*R + v at k = c*h + 4e + j."""
    n, k = 48, 64
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (n, k), dtype=np.uint8)
    scales = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    out = GV.pack_vnni_weights(quant.pack_codes(codes, bits), scales, scales + 1, bits, k)
    rows, c = 16 * GV.vnni_tiles(n, bits), 32 // bits
    assert rows == 16 and out["codes"].shape == (n // rows, k // c * rows * 4)
    for row, kk in [(0, 0), (17, 5), (47, 63), (30, 37)]:
        r, v, h, e, j = row // rows, row % rows, kk // c, (kk % c) // 4, kk % 4
        byte = out["codes"][r, (h * rows + v) * 4 + j]
        assert (byte >> (bits * e)) & ((1 << bits) - 1) == codes[row, kk]
    assert out["scales"][2, 1, 3] == scales[35, 1] and out["offsets"][2, 1, 3] == scales[35, 1] * (scales[35, 1] + 1)


@needs_vnni
@pytest.mark.parametrize("bits", [2, 4])
def test_vnni_gemv_uses_vpdpbusd_on_zmm(bits):
    asm = _compile(GV.vnni_gemv_kernel(512, 64, bits, 128, False, False, HOST)).mod.inspect_source("asm")
    assert re.search(r"vpdpbusd\s+(\S+,\s*)?%zmm\d+,\s*%zmm\d+,\s*%zmm\d+", asm)
    steps, fields = 128 // (32 // bits), 8 // bits  # one block unrolled: tiles x steps x fields
    assert asm.count("vpdpbusd") >= GV.vnni_tiles(64, bits) * steps * fields


@pytest.mark.parametrize("k,n,bits,group_size,match", [
    (256, 40, 4, 128, "multiple of 16"), (256, 64, 3, 128, "bits must be one of"),
    (256, 64, 8, 0, "bits must be one of"), (96, 64, 4, 24, "multiple of 16")])
def test_vnni_unsupported_shapes_are_refused(k, n, bits, group_size, match):
    reason = GV.vnni_supported(k, n, bits, group_size, HOST) if VNNI else "no VNNI"
    assert reason is not None and (match in reason or not VNNI)
    with pytest.raises(ValueError, match="no VNNI GEMV"):
        GV.vnni_gemv_kernel(k, n, bits, group_size, True, False, HOST)


def test_vnni_needs_an_x86_vnni_target():
    assert not GV.has_vnni(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))
    assert "VNNI" in GV.vnni_supported(256, 64, 4, 128, {"kind": "llvm", "mtriple": "aarch64-linux-gnu"})


# ---------------------------------------------------------------------------- compile path
@needs_vnni
@pytest.mark.parametrize("bits", [2, 4])
def test_auto_picks_vnni_for_batch1_and_matches_model(tmp_path, bits):
    """A batch-1 MLP (256 -> 128 -> Relu -> 64, g64): both QLinears get the VNNI GEMV under
    --gemv-kernel auto, the recipe and report record it, and the artifact matches the MLP
    through :func:`gemv_vnni.vnni_gemv_reference` layer by layer."""
    import json

    import qcompile
    from conftest import make_mlp_onnx
    from qcompile.config import CompileConfig
    from qcompile.driver import import_model
    from qcompile.pipeline import optimize

    path = make_mlp_onnx(tmp_path / "mlp.onnx", in_dim=256, hidden=128, out_dim=64, batch=1)
    art = qcompile.compile(path, output=tmp_path / "out", verify=False, bits=bits, group_size=64)
    recipe = [e for e in art.manifest["recipe"] if e["op"] == "QLinear"]
    assert [e["gemv_kernel"] for e in recipe] == ["vnni", "vnni"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [d["kernel"] for d in report["gemv_kernels"]] == ["vnni", "vnni"]
    g = optimize(import_model(path, None)[0], CompileConfig(bits=bits, group_size=64))[1]
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    h = x
    for node in g.nodes:
        if node.op == "Relu":
            h = np.maximum(h, 0)
        elif node.op == "QLinear":
            qweight, scales, zeros, bias = (g.constants[name] if name else None for name in node.inputs[1:5])
            h = GV.vnni_gemv_reference(h, qweight, scales, zeros, bits, 64, bias)
    got = art.load()(x=x)
    np.testing.assert_allclose(got, h, rtol=0, atol=1e-4 * np.abs(h).max())


@pytest.mark.parametrize("hidden,bits,group_size,kernels", [(40, 4, 0, ["dequant", "lut"]),
                                                            (128, 3, 64, ["lut", "lut"])])
def test_auto_falls_back_where_vnni_does_not_fit(tmp_path, hidden, bits, group_size, kernels):
    """Per-channel 4-bit with hidden 40: layer 1 (n = 40, no multiple of 16) fits neither
    VNNI nor LUT (dequant GEMV, both reasons), layer 2 (one group of k = 40) only LUT;
    3-bit: no VNNI, the LUT GEMV, with VNNI's reason recorded."""
    from conftest import make_mlp_onnx
    from qcompile.backends.lut_lowering import choose_gemv_kernels
    from qcompile.config import CompileConfig
    from qcompile.driver import import_model
    from qcompile.pipeline import optimize

    if not VNNI:
        pytest.skip("host has no AVX-512 VNNI")
    path = make_mlp_onnx(tmp_path / "mlp.onnx", in_dim=256, hidden=hidden, out_dim=64, batch=1)
    g = optimize(import_model(path, None)[0], CompileConfig(bits=bits, group_size=group_size))[1]
    out, decisions = choose_gemv_kernels(g, HOST)
    assert [d["kernel"] for d in decisions] == kernels
    first = decisions[0]["reason"]
    assert first.startswith("vnni: ") and ("multiple of 16" in first or "bits must be" in first)
    if kernels[0] == "dequant":
        assert "lut: " in first
    recipe = {e["node"]: e for e in out.metadata["quant_recipe"]}
    assert recipe[decisions[0]["node"]]["gemv_reason"] == first
