"""int8 GEMMs on arm64 (issue 6): ``sdot`` / ``smmla`` in the W8A8 and integer-only linear layers.

The kernels run under qemu-aarch64 (``-cpu max`` has dotprod and i8mm) and must equal the numpy
references bit for bit; the disassembly must show the instruction. Needs the arm64 toolchain
(see ``test_arm64.py``): without it these tests skip, with ``QCOMPILE_REQUIRE_ARM64=1`` they fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from qcompile.backends import int8_gemm, int8_kernels, integer_kernels
from qcompile.backends.arm64 import QemuModule, arm64_target, export_library, toolchain
from qcompile.backends.arm64.int8_gemm import codes_matmul, pack_sdot, pack_smmla
from qcompile.backends.llvm import host_target, relax_pipeline
from qcompile.interpreter_int8 import int8_linear
from qcompile.interpreter_integer import int_linear

from test_arm64 import arm64_env  # noqa: F401  (fixture: skips or fails without the toolchain)

SEED = 0
# the instruction each kind must compile to, as objdump spells it
MNEMONIC = {"sdot": "sdot\tv", "smmla": "smmla\tv"}
CPU_OF = {"sdot": "cortex-a76", "smmla": "neoverse-n2"}


# ---------------------------------------------------------------------------- dispatch (no toolchain)
def test_select_by_target_and_shape():
    a76, n2 = arm64_target("cortex-a76"), arm64_target("neoverse-n2")
    assert [int8_gemm.select(arm64_target(c), 8, 64, 32) for c in ("cortex-a55", "neoverse-n1", "apple-m1")] \
        == ["sdot"] * 3
    assert int8_gemm.select(a76, 8, 64, 32) == "sdot"
    assert int8_gemm.select(n2, 8, 64, 32) == "smmla"
    assert int8_gemm.select(n2, 7, 64, 32) == "sdot"        # smmla needs an even M ...
    assert int8_gemm.select(n2, 8, 60, 32) == "sdot"        # ... and K % 8
    assert int8_gemm.select(a76, 8, 64, 10) == "portable"   # sdot needs N % 4
    assert int8_gemm.select(a76, 8, 62, 32) == "portable"   # ... and K % 4
    no_dot = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert int8_gemm.select(no_dot, 8, 64, 32) == "portable"
    assert int8_gemm.select(host_target(1), 8, 64, 32) in ("vnni", "portable")
    assert int8_gemm.kind_of(True) == "vnni" and int8_gemm.kind_of(False) == "portable"
    with pytest.raises(ValueError, match="unknown int8 GEMM kind"):
        int8_gemm.kind_of("amx")


def test_packings_and_corrections():
    w = np.arange(16 * 8).reshape(16, 8).astype(np.int8)
    s, m = pack_sdot(w), pack_smmla(w)
    assert s.shape == (2, 4, 4, 4) and s[1, 2, 3, 1] == w[2 * 4 + 1, 1 * 4 + 3]
    assert m.shape == (4, 2, 2, 8) and m[3, 1, 1, 5] == w[1 * 8 + 5, 3 * 2 + 1]
    assert np.array_equal(int8_gemm.pack("portable", w), w)
    for kind in ("sdot", "smmla"):  # these compute on u - 128 directly
        assert not int8_gemm.zero_point_correction(kind, w).any()
    np.testing.assert_array_equal(int8_gemm.zero_point_correction("portable", w), 128 * w.astype(np.int64).sum(0))
    with pytest.raises(ValueError, match="K % 8"):
        pack_smmla(w[:12])
    with pytest.raises(ValueError, match="M % 2"):
        codes_matmul(3, 16, 8, "smmla")


# ---------------------------------------------------------------------------- kernels under qemu
def _run_kernel(tmp_path, runtime, func, cpu, arrays, out_shape, out_dtype):
    """Compile ``func`` for ``cpu`` as a one-call Relax module, run it under qemu; (output, disassembly)."""
    target = arm64_target(cpu)
    bb = relax.BlockBuilder()
    names = [f"in{i}" for i in range(len(arrays))]
    params = [relax.Var(name, relax.TensorType(a.shape, str(a.dtype))) for name, a in zip(names, arrays)]
    with bb.function("main", params):
        with bb.dataflow():
            gvar = bb.add_func(func, "gemm")
            y = bb.emit(relax.call_tir(gvar, params, relax.TensorType(out_shape, out_dtype)))
            out = bb.emit_output(relax.Tuple([y]))
        bb.emit_func_output(out)
    library = export_library(tvm.compile(bb.get(), target=target, relax_pipeline=relax_pipeline(target)),
                             tmp_path / "gemm.so")
    body = toolchain.function_bodies(toolchain.disassemble(library))["gemm_compute_"]
    runner = toolchain.build_runner(runtime, tmp_path / "runner")
    got = QemuModule(library, runner, names, ["y"], runtime=runtime)(dict(zip(names, arrays)))["y"]
    return got, body


def _codes_and_weights(m, k, n, seed=SEED):
    rng = np.random.default_rng(seed)
    u = rng.integers(1, 256, (m, k)).astype(np.uint8)
    u[0, :4] = [1, 128, 255, 129]  # code extremes: -127, 0, 127, 1
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    w[:, 0] = -127  # one column at the weight extreme
    return u, w


@pytest.mark.parametrize("kind,m,k,n", [("sdot", 12, 96, 40), ("sdot", 5, 36, 8), ("smmla", 12, 96, 40),
                                        ("smmla", 2, 8, 2), ("portable", 5, 36, 10)])
def test_int_linear_kernel_bit_exact(tmp_path, arm64_env, kind, m, k, n):  # noqa: F811
    u, w = _codes_and_weights(m, k, n)
    bias = np.random.default_rng(1).integers(-(2**20), 2**20, n).astype(np.int64)
    cpu = CPU_OF.get(kind, "cortex-a55")
    func = integer_kernels.int_linear_kernel(m, k, n, kind, arm64_target(cpu))
    folded = (bias - int8_gemm.zero_point_correction(kind, w)).astype(np.int32)
    got, body = _run_kernel(tmp_path, arm64_env, func, cpu, [u, int8_gemm.pack(kind, w), folded], (m, n), "int32")
    np.testing.assert_array_equal(got, int_linear(u, w, bias))
    for other, mnemonic in MNEMONIC.items():
        assert (mnemonic in body) == (other == kind), (kind, other)


@pytest.mark.parametrize("kind", ["sdot", "smmla"])
def test_int8_linear_kernel_matches_portable_and_reference(tmp_path, arm64_env, kind):  # noqa: F811
    """W8A8 (float epilogue): the integer part is the same; the output equals the portable kernel's."""
    m, k, n = 8, 64, 24
    u, w = _codes_and_weights(m, k, n, seed=2)
    rng = np.random.default_rng(3)
    xs = rng.uniform(0.001, 0.1, (m, 1)).astype(np.float32)
    ws = rng.uniform(0.001, 0.1, n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    outs = {}
    for gemm in (kind, "portable"):
        func = int8_kernels.int8_linear_kernel(m, k, n, True, True, gemm, arm64_target(CPU_OF[kind]))
        corr = int8_gemm.zero_point_correction(gemm, w).astype(np.int32)
        (tmp_path / gemm).mkdir()
        outs[gemm], body = _run_kernel(tmp_path / gemm, arm64_env, func, CPU_OF[kind],
                                       [u, xs, int8_gemm.pack(gemm, w), ws, corr, b], (m, n), "float32")
        assert (MNEMONIC[kind] in body) == (gemm == kind)
    np.testing.assert_array_equal(outs[kind], outs["portable"])
    ref = int8_linear(u, xs, w, ws, b)
    np.testing.assert_allclose(outs[kind], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


# ---------------------------------------------------------------------------- digits MLP, integer-only
@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn.datasets")
    from digits_helpers import train_and_export

    path, _, x, _, xtr = train_and_export("mlp", tmp_path_factory.mktemp("digits"))
    return path, x, xtr[: len(x)]


def _integer_reference(path, x, calib):
    """The integer-only graph the compiler builds (same config and calibration), run by numpy."""
    from qcompile.config import CompileConfig
    from qcompile.driver import import_model
    from qcompile.interpreter import run
    from qcompile.pipeline import optimize

    graph, _ = import_model(path)
    _, integer = optimize(graph, CompileConfig(bits=8, act_bits=8, integer_only=True), calibration={"x": calib})
    assert sum(n.op == "IntLinear" for n in integer.nodes) == 3
    return run(integer, {"x": x})["logits"]


@pytest.mark.slow
@pytest.mark.parametrize("cpu,kind,layers", [("cortex-a76", "sdot", 2), ("neoverse-n2", "smmla", 3)])
def test_digits_mlp_integer_only_under_qemu(tmp_path, arm64_env, digits_mlp, cpu, kind, layers):  # noqa: F811
    """Issue 6: W8A8 integer-only digits MLP (360 x 64-128-64-10) on arm64 equals the numpy integer
    reference bit for bit, and its GEMMs are sdot (cortex-a76: the 64 -> 10 layer has N % 4 != 0
    and stays portable) or smmla (neoverse-n2: all three)."""
    import qcompile

    path, x, calib = digits_mlp
    art = qcompile.compile(path, output=tmp_path / cpu, target="arm64", cpu=cpu, bits=8, act_bits=8,
                           integer_only=True, calib_inputs={"x": calib}, eval_inputs={"x": x})
    # the compile-time check ran the artifact under qemu against the integer reference
    assert art.manifest["accuracy"]["logits"]["compiled_vs_fake_quant"]["max_abs_error"] == 0.0
    got = qcompile.load(art.path)(x)
    np.testing.assert_array_equal(got, _integer_reference(path, x, calib))
    _check_gemms(art.path / "model.so", "int_linear", kind, layers)


def _check_gemms(library, prefix: str, kind: str, layers: int) -> None:
    """The three GEMM kernels named ``prefix*`` of ``library``: ``layers`` use ``kind``'s
    instruction, none uses the other arm one."""
    bodies = toolchain.function_bodies(toolchain.disassemble(library))
    gemms = {name: body for name, body in bodies.items() if name.startswith(prefix) and name.endswith("_compute_")}
    assert len(gemms) == 3, sorted(bodies)
    assert sum(MNEMONIC[kind] in body for body in gemms.values()) == layers, kind
    other = next(k for k in MNEMONIC if k != kind)
    assert not any(MNEMONIC[other] in body for body in gemms.values())


@pytest.mark.slow
def test_digits_mlp_w8a8_dynamic_uses_sdot(tmp_path, arm64_env, digits_mlp):  # noqa: F811
    """The W8A8 path (``Int8Linear``, dynamic per-row activation scales, float epilogue) on
    cortex-a76: sdot GEMMs, and the same output as the reference up to float32 rounding."""
    import qcompile

    path, x, _ = digits_mlp
    art = qcompile.compile(path, output=tmp_path / "w8a8", target="arm64", cpu="cortex-a76", bits=8, act_bits=8,
                           eval_inputs={"x": x})
    err = art.manifest["accuracy"]["logits"]["compiled_vs_fake_quant"]["max_abs_error"]
    assert err <= 1e-5, err
    _check_gemms(art.path / "model.so", "int8_linear", "sdot", 2)
