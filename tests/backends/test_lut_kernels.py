"""LUT (T-MAC style) GEMV kernels (backends/lut_kernels.py, schedules/lut.py); no timing.

Host x86 runs every ISA variant this machine has (AVX-512BW, AVX2, SSSE3 via ``mcpu``); the
aarch64 NEON ``tbl`` variant is cross-built and run under qemu (skipped without the arm64
toolchain unless ``QCOMPILE_REQUIRE_ARM64=1``).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from qcompile import quant
from qcompile.backends import lut_kernels as LK
from qcompile.schedules import lut as SL

HOST_CPU = tvm.target.codegen.llvm_get_system_cpu()
# mcpu -> the ISA it must select; all run on a host with AVX-512BW
X86_CPUS = {HOST_CPU: "avx512bw", "haswell": "avx2", "nehalem": "ssse3"}
_HOST_HAS = {isa: tvm.target.codegen.target_has_features([isa], tvm.target.Target({"kind": "llvm", "mcpu": HOST_CPU}))
             for isa in ("avx512bw", "avx2", "ssse3")}
# float parts of kernel vs reference: summation order only
REF_RTOL = 1e-5


def _target(mcpu: str = HOST_CPU) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})


def _case(seed, k, n, bits, group_size, symmetric):
    rng = np.random.default_rng(seed)
    groups = k // group_size if group_size else 1
    packed = quant.pack_codes(rng.integers(0, 1 << bits, (n, k), dtype=np.uint8), bits)
    scales = (rng.random((n, groups), dtype=np.float32) * 0.1 + 0.01).astype(np.float32)
    zeros = None if symmetric else rng.integers(0, 1 << bits, (n, groups)).astype(np.float32)
    x = rng.standard_normal((1, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    return x, packed, scales, zeros, bias


def _compile(func, target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def _run_host(k, n, bits, group_size, symmetric, has_bias, target, case):
    x, packed, scales, zeros, bias = case
    rows = SL.lut_isa(target).rows
    lut = LK.pack_lut_weights(packed, scales, zeros, bits, group_size, k, rows)
    mod = _compile(LK.lut_gemv_kernel(k, n, bits, group_size, symmetric, has_bias, target), target)
    out = tvm.runtime.tensor(np.zeros((1, n), np.float32))
    args = [x, *LK.lut_arrays(lut, bias if has_bias else None)]
    mod.mod["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy(), mod


def _check_against_references(got, case, bits, group_size, has_bias):
    x, packed, scales, zeros, bias = case
    bias = bias if has_bias else None
    want = LK.lut_gemv_reference(x, packed, scales, zeros, bits, group_size, bias)
    np.testing.assert_allclose(got, want, rtol=0, atol=REF_RTOL * max(1.0, np.abs(want).max()))
    k = x.shape[1]
    exact = x.astype(np.float64) @ quant.dequantize_weight(packed, scales, zeros, bits, group_size, k)
    exact = exact + (bias if bias is not None else 0)
    bound = LK.table_error_bound(x, scales, bits, group_size)
    err = np.abs(got - exact)
    assert (err <= bound + 1e-4).all(), float((err - bound).max())
    # the bound is a worst case; independent roundings (uniform, variance step^2 / 12) cancel:
    # the RMS error stays within twice their expected RMS
    assert np.sqrt(np.mean(err ** 2)) < 2 * np.sqrt(np.mean(_rounding_variance(x, scales, bits, group_size)))


def _rounding_variance(x, scales, bits, group_size):
    k = x.shape[1]
    group, block = group_size or k, LK.lut_block(k, group_size)
    _, tscale = LK.lut_tables(x, block)
    s = np.asarray(scales, np.float64)[:, np.arange(k // block) * block // group]
    planes = sum(4 ** i for i in range(bits))
    return ((0.5 * s) ** 2 * planes * (block // 4) * tscale.astype(np.float64) ** 2 / 12).sum(axis=1)


# ---------------------------------------------------------------------------- packing, tables
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_planes_hold_every_bit_of_every_code(bits):
    rng = np.random.default_rng(bits)
    k, n, rows = 64, 32, 8
    pairs = (bits + 1) // 2
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    lut = LK.pack_lut_weights(quant.pack_codes(codes, bits), np.ones((n, 1), np.float32), None, bits, 0, k, rows)
    planes = lut["planes"]
    assert planes.shape == (n // rows, k // 8, pairs, 2 * rows) and planes.dtype == np.uint8
    # byte [r, h, p, 2v + e]: row r*rows + v, plane 2p + e, nibbles of k = 8h..8h+3 | 8h+4..8h+7
    by_plane = planes.reshape(n // rows, k // 8, pairs, rows, 2).transpose(0, 3, 1, 2, 4)
    by_plane = by_plane.reshape(n, k // 8, 2 * pairs)
    decoded = np.zeros((n, k), np.uint8)
    for kk in range(k):
        nib = (by_plane[:, kk // 8, :] >> (4 * ((kk // 4) % 2))) & 15
        bit = (nib >> (kk % 4)) & 1  # [n, 2 * pairs]
        decoded[:, kk] = (bit[:, :bits] << np.arange(bits)).sum(axis=1)
        assert not bit[:, bits:].any()  # the padding plane of odd bits is zero
    np.testing.assert_array_equal(decoded, codes)
    assert lut["woffset"] is None
    np.testing.assert_array_equal(lut["wscale"], np.full((n // rows, 1, rows), 0.5, np.float32))


def test_tables_are_int8_signed_sums_within_half_a_step():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(256).astype(np.float32)
    tab, tscale = LK.lut_tables(x, 128)
    assert tab.shape == (64, 16) and tscale.shape == (2,)
    assert np.abs(tab.astype(int)).max() == 127  # the largest |sum| of each block maps to 127
    signs = np.where((np.arange(16)[:, None] >> np.arange(4)) & 1, 1.0, -1.0)
    exact = x.reshape(64, 4).astype(np.float64) @ signs.T
    step = np.repeat(tscale, 32)[:, None]
    assert (np.abs(tab * step - exact) <= step / 2 + 1e-6).all()
    np.testing.assert_array_equal(tab[:, ::-1], -tab)  # T[15 - c] = -T[c]


def test_zero_activations_give_zero_tables():
    tab, tscale = LK.lut_tables(np.zeros(64, np.float32), 64)
    assert not tab.any() and not tscale.any()


# ---------------------------------------------------------------------------- host kernels
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,n,group_size,has_bias", [(256, 128, 128, True), (1024, 64, 0, False), (192, 192, 64, True)])
def test_lut_gemv_matches_references(bits, symmetric, k, n, group_size, has_bias):
    case = _case(bits * 11 + k, k, n, bits, group_size, symmetric)
    got, _ = _run_host(k, n, bits, group_size, symmetric, has_bias, _target(), case)
    _check_against_references(got, case, bits, group_size, has_bias)


@pytest.mark.parametrize("mcpu", sorted(X86_CPUS))
def test_each_x86_isa_uses_its_shuffle_and_is_correct(mcpu):
    isa = X86_CPUS[mcpu]
    if not _HOST_HAS[isa]:
        pytest.skip(f"host lacks {isa}")
    target = _target(mcpu)
    assert SL.lut_isa(target).name == isa
    k, n, bits = 256, 128, 2
    case = _case(5, k, n, bits, 128, False)
    got, mod = _run_host(k, n, bits, 128, False, True, target, case)
    _check_against_references(got, case, bits, 128, True)
    reg = {"avx512bw": "zmm", "avx2": "ymm", "ssse3": "xmm"}[isa]
    asm = mod.mod.inspect_source("asm")
    assert re.search(rf"\bv?pshufb\s+%{reg}", asm), isa
    assert SL.lut_isa(target).intrin in mod.mod.inspect_source("ll")


def test_refusals_are_clear():
    host = _target()
    assert "bits must be" in LK.lut_supported(256, 128, 8, 128, host)
    assert "multiple of 32" in LK.lut_supported(256, 80, 4, 128, host)
    assert "must divide k" in LK.lut_supported(256, 128, 4, 100, host)
    assert "no byte shuffle" in LK.lut_supported(256, 128, 4, 128, tvm.target.Target({"kind": "c"}))
    with pytest.raises(ValueError, match="no LUT GEMV for k=256 n=80"):
        LK.lut_gemv_kernel(256, 80, 4, 128, True, False, host)
    assert LK.lut_block(4096, 0) == 256 and LK.lut_block(4096, 128) == 128 and LK.lut_block(1920, 960) == 240


def test_choose_m1_kernel():
    host = _target()
    assert LK.choose_m1_kernel(4096, 4096, 8, 128, host) == "dequant"  # not offered at 8 bits
    assert LK.choose_m1_kernel(4096, 4096, 4, 128, host) == "lut"
    assert LK.choose_m1_kernel(4096, 4096, 2, 128, host) == "lut"
    timings = {"lut": 2.0, "dequant": 1.0}
    assert LK.choose_m1_kernel(4096, 4096, 2, 128, host, measure=timings.__getitem__) == "dequant"
    measure = LK.measured_cost(256, 64, 4, 128, False, host, repeats=3)
    assert measure("lut") > 0 and measure("dequant") > 0
    assert LK.choose_m1_kernel(256, 64, 4, 128, host, measure=measure) in ("lut", "dequant")


# ---------------------------------------------------------------------------- aarch64 (qemu)
def _arm64_or_skip():
    from arm64_helpers import arm64_runtime_or_skip

    return arm64_runtime_or_skip()


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False), (4, False)])
def test_aarch64_uses_tbl_and_matches_reference_under_qemu(tmp_path, bits, symmetric):
    runtime = _arm64_or_skip()
    from tvm import relax

    from qcompile.backends.arm64 import QemuModule, export_library, toolchain
    from qcompile.backends.llvm import relax_pipeline

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1",
                                "mattr": ["+neon"]})
    assert SL.lut_isa(target) == SL.NEON
    k, n, group = 256, 64, 128
    case = _case(bits, k, n, bits, group, symmetric)
    x, packed, scales, zeros, bias = case
    arrays = [x, *LK.lut_arrays(LK.pack_lut_weights(packed, scales, zeros, bits, group, k, SL.NEON.rows), bias)]
    names = ["x", "planes", "wscale"] + ([] if symmetric else ["woffset"]) + ["bias"]
    bb = relax.BlockBuilder()
    params = [relax.Var(nm, relax.TensorType(a.shape, str(a.dtype))) for nm, a in zip(names, arrays)]
    with bb.function("main", params):
        with bb.dataflow():
            gv = bb.add_func(LK.lut_gemv_kernel(k, n, bits, group, symmetric, True, target), "lut_gemv")
            y = bb.emit(relax.call_tir(gv, params, relax.TensorType((1, n), "float32")))
            out = bb.emit_output(relax.Tuple([y]))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=target, relax_pipeline=relax_pipeline(target))
    library = export_library(ex, tmp_path / "lut.so")
    bodies = toolchain.function_bodies(toolchain.disassemble(library))
    body = next(b for name, b in bodies.items() if name.startswith("lut_gemv"))
    assert re.search(r"\btbl\s+v\d+\.16b", body)
    assert re.search(r"\bs(add|ada)lp\s+v\d+\.8h, v\d+\.16b", body)  # the plane-pair combine
    runner = toolchain.build_runner(runtime, tmp_path / "runner")
    got = QemuModule(library, runner, names, ["y"], num_threads=2, runtime=runtime)(dict(zip(names, arrays)))["y"]
    _check_against_references(got, case, bits, group, True)


@pytest.mark.parametrize("bits", [3, 4])
def test_worst_case_accumulators_do_not_overflow(bits):
    """Every lookup at +127 (all activations equal and positive, every code all ones), over
    the longest block (256): the int16 pair accumulators reach 3 * 127 * 64 = 24384."""
    k, n = 1024, 64
    x = np.full((1, k), 0.5, np.float32)
    packed = quant.pack_codes(np.full((n, k), (1 << bits) - 1, np.uint8), bits)
    scales = np.full((n, 1), 0.01, np.float32)
    case = (x, packed, scales, None, np.zeros(n, np.float32))
    assert LK.lut_block(k, 0) == 256
    got, _ = _run_host(k, n, bits, 0, True, False, _target(), case)
    want = LK.lut_gemv_reference(x, packed, scales, None, bits, 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    exact = k * 0.5 * ((1 << bits) - 1 - (1 << (bits - 1))) * 0.01
    np.testing.assert_allclose(got, exact, rtol=1e-5)
