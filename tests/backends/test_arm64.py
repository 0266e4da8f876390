"""The arm64 target: artifacts cross-compiled for aarch64 and run under qemu-user match the host.

Needs ``aarch64-linux-gnu-g++``, ``aarch64-linux-gnu-objdump``, ``qemu-aarch64`` and the
aarch64 TVM runtime (downloaded once into ~/.cache/qcompile/arm64-runtime). Without them the
tests that need them skip, saying what is missing; with ``QCOMPILE_REQUIRE_ARM64=1`` (set by
``.ci/run``) they fail instead. qemu timings are never measured here: they mean nothing for ARM.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import qcompile
from qcompile.backends.arm64 import CPU_FEATURES, arm64_target, toolchain
from qcompile.cli import main as cli_main
from qcompile.config import ARM64_CPUS, CompileConfig
from qcompile.errors import InputError, ToolchainError

from conftest import make_mlp_onnx

SEED = 0


# ---------------------------------------------------------------------------- environment
def _missing_tools() -> list[str]:
    missing = [t for t in (toolchain.CXX, toolchain.OBJDUMP, toolchain.QEMU) if toolchain.find_tool(t) is None]
    if not Path(toolchain.SYSROOT, "lib").is_dir():
        missing.append(toolchain.SYSROOT)
    return missing


def _unavailable(reason: str):
    if os.environ.get("QCOMPILE_REQUIRE_ARM64"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def arm64_env():
    missing = _missing_tools()
    if missing:
        _unavailable(f"arm64 toolchain missing: {', '.join(missing)} "
                     "(apt-get install g++-aarch64-linux-gnu qemu-user)")
    try:
        return toolchain.device_runtime()
    except ToolchainError as err:
        _unavailable(f"aarch64 TVM runtime unavailable: {err}")


# ---------------------------------------------------------------------------- models
class _Block:
    """A post-LN BERT-style block: fused QKV, 4-head attention, residuals, LayerNorm, GELU FFN."""

    @staticmethod
    def export(path: Path, dim=64, heads=4, hidden=128, batch=2, seq=16) -> Path:
        import torch

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
                self.up, self.down = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
                self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)

            def forward(self, x):
                q, k, v = self.qkv(x).reshape(batch, seq, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
                att = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
                h = (att @ v).transpose(1, 2).reshape(batch, seq, dim)
                x = self.norm1(x + self.proj(h))
                return self.norm2(x + self.down(torch.nn.functional.gelu(self.up(x))))

        torch.manual_seed(SEED)
        with warnings.catch_warnings():  # legacy exporter's deprecation and tracer warnings
            warnings.simplefilter("ignore")
            torch.onnx.export(Block().eval(), (torch.randn(batch, seq, dim),), str(path), input_names=["x"],
                              output_names=["y"], dynamo=False, opset_version=17)
        return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("arm64_models")
    return {"mlp": make_mlp_onnx(root / "mlp.onnx"), "block": _Block.export(root / "block.onnx")}


def _feeds(name: str) -> dict:
    rng = np.random.default_rng(SEED + 1)
    shape = (4, 64) if name == "mlp" else (2, 16, 64)
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def _host_and_arm(tmp_path, onnx_path, bits, cpu=None, verify_arm=False, **kw):
    """Compile for the host and for arm64; ``verify_arm`` runs the driver's check (under qemu)."""
    opts = dict(bits=bits, group_size=32 if bits == 4 else 0, **kw)
    host = qcompile.compile(onnx_path, output=tmp_path / "host", verify=False, **opts)
    arm = qcompile.compile(onnx_path, output=tmp_path / "arm", target="arm64", cpu=cpu, verify=verify_arm, **opts)
    return host, arm


# ---------------------------------------------------------------------------- targets and config
def test_cpu_table_and_targets():
    assert set(CPU_FEATURES) == set(ARM64_CPUS)
    for cpu in ARM64_CPUS:
        t = arm64_target(cpu)
        assert str(t.attrs["mtriple"]) == "aarch64-linux-gnu" and str(t.attrs["mcpu"]) == cpu
        assert bool(t.attrs["feature.has_asimd"]) and bool(t.attrs["feature.has_dotprod"]), cpu
        assert bool(t.attrs["feature.has_matmul_i8"]) == (cpu == "neoverse-n2"), cpu
    assert str(arm64_target().attrs["mcpu"]) == "neoverse-n1"


def test_cpu_option_is_checked(tmp_path, capsys):
    with pytest.raises(InputError, match="--cpu applies to --target arm64"):
        CompileConfig(cpu="neoverse-n1")
    with pytest.raises(InputError, match="--cpu must be one of"):
        CompileConfig(target="arm64", cpu="cortex-a53")
    assert CompileConfig(target="arm64").target_cpu == "neoverse-n1"
    onnx_path = make_mlp_onnx(tmp_path / "mlp.onnx")
    assert cli_main([str(onnx_path), "-o", str(tmp_path / "o"), "--target", "arm64", "--cpu", "x"]) == 2
    assert "--cpu must be one of" in capsys.readouterr().err


# ---------------------------------------------------------------------------- qemu vs host
def test_mlp_fp32_artifact_matches_host(tmp_path, arm64_env, models):
    host, arm = _host_and_arm(tmp_path, models["mlp"], 16, verify_arm=True)
    manifest = arm.manifest
    assert manifest["target"] == "arm64"
    assert set(manifest["files"]) == {"model.so", "runner", "runner.cc", "report.json"}
    device = manifest["device"]
    assert device["cpu"] == "neoverse-n1" and device["mattr"] == ["+neon", "+dotprod"]
    assert set(device["runtime"]["libraries"]) == {"libtvm_runtime.so", "libtvm_ffi.so"}
    assert device["runtime"]["packages"] == arm64_env.packages
    # the compile-time check ran the artifact under qemu
    assert manifest["accuracy"]["y"]["compiled_vs_fake_quant"]["max_abs_error"] <= 1e-5
    feeds = _feeds("mlp")
    want, got = host.load()(**feeds), qcompile.load(arm.path)(**feeds)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_mlp_w4_matches_host(tmp_path, arm64_env, models):
    host, arm = _host_and_arm(tmp_path, models["mlp"], 4, cpu="neoverse-n2")
    assert arm.manifest["device"]["mattr"] == ["+neon", "+dotprod", "+i8mm"]
    feeds = _feeds("mlp")
    np.testing.assert_allclose(arm.load()(**feeds), host.load()(**feeds), rtol=0, atol=1e-3)


@pytest.mark.parametrize("bits,atol", [(16, 1e-5), (4, 1e-3)])
def test_transformer_block_matches_host(tmp_path, arm64_env, models, bits, atol):
    host, arm = _host_and_arm(tmp_path, models["block"], bits)
    feeds = _feeds("block")
    np.testing.assert_allclose(arm.load()(**feeds), host.load()(**feeds), rtol=0, atol=atol)
    bodies = toolchain.function_bodies(toolchain.disassemble(arm.path / "model.so"))
    kernels = {n: b for n, b in bodies.items() if n.endswith("_compute_") and "linear" in n}
    assert kernels, sorted(bodies)
    for name, body in kernels.items():  # NEON fused multiply-add on 4 x f32 vectors
        assert "fmla\tv" in body and ".4s" in body, name


def test_cli_run_on_arm64_artifact(tmp_path, arm64_env, models):
    out = tmp_path / "art"
    assert cli_main([str(models["mlp"]), "-o", str(out), "--target", "arm64", "--no-verify", "-q"]) == 0
    np.savez(tmp_path / "in.npz", **_feeds("mlp"))
    assert cli_main(["run", str(out), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz")]) == 0
    with np.load(tmp_path / "o.npz") as result:
        assert result["y"].shape == (4, 32)


def test_without_qemu_compile_skips_the_check_and_run_is_a_clear_error(tmp_path, arm64_env, models, monkeypatch):
    import qcompile.backends.arm64 as arm64

    real = toolchain.find_tool
    monkeypatch.setattr(toolchain, "find_tool", lambda name: None if name == toolchain.QEMU else real(name))
    monkeypatch.setattr(arm64, "qemu_available", lambda: False)
    art = qcompile.compile(models["mlp"], output=tmp_path / "art", target="arm64", bits=16)
    assert "qemu-aarch64 not found" in art.manifest["accuracy"]["skipped"]
    with pytest.raises(ToolchainError, match="qemu-aarch64 not found.*apt-get install qemu-user"):
        qcompile.load(art.path)


# ---------------------------------------------------------------------------- MiniLM
@pytest.mark.slow
def test_minilm_w4_g32_under_qemu_matches_host(tmp_path, arm64_env, minilm_onnx):
    from qcompile.models import minilm

    batch = 1  # qemu translates every instruction: one sentence keeps this under a minute
    feeds = minilm.tokenize(minilm.SENTENCES[:batch], 128)
    shapes = {name: (batch, 128) for name in minilm.INPUT_NAMES}
    host, arm = _host_and_arm(tmp_path, minilm_onnx, 4, shapes=shapes)
    want, got = host.load()(**feeds), arm.load()(**feeds)
    assert got.shape == (batch, 384)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_minilm_w8a8_integer_only_under_qemu_is_bit_exact(tmp_path, arm64_env, minilm_onnx):
    """Issue 6, acceptance 1: integer-only MiniLM (sdot GEMMs on cortex-a76) under qemu equals the
    host artifact bit for bit; the host artifact equals the numpy integer reference (its
    compile-time check, compiled_vs_fake_quant, is exact)."""
    from qcompile.models import minilm

    feeds = minilm.tokenize(minilm.SENTENCES[:1], 128)
    shapes = {name: (1, 128) for name in minilm.INPUT_NAMES}
    calib = minilm.tokenize(minilm.CALIB_SENTENCES[:8], 128)
    opts = dict(bits=8, act_bits=8, integer_only=True, shapes=shapes, calib_inputs=calib)
    host = qcompile.compile(minilm_onnx, output=tmp_path / "host", eval_inputs=feeds, **opts)
    assert host.manifest["accuracy"]["embedding"]["compiled_vs_fake_quant"]["max_abs_error"] == 0.0
    arm = qcompile.compile(minilm_onnx, output=tmp_path / "arm", target="arm64", cpu="cortex-a76", verify=False,
                           **opts)
    np.testing.assert_array_equal(arm.load()(**feeds), host.load()(**feeds))


# Max abs difference of the embedding, arm64 under qemu vs the host artifact. Measured
# (1 sentence, seq 32): dynamic 3.0e-8, qdq 1.5e-8, nbits32 1.1e-7, nbits128 1.3e-7 -- float
# summation order only (NEON vs AVX); 1e-6 leaves ~8x margin. No activation code flips.
_PREQUANT_ATOL = 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dynamic", "qdq", "nbits32", "nbits128"])
def test_minilm_prequantized_under_qemu_matches_host(tmp_path, arm64_env, quantized_minilm, name):
    """Issue 5, acceptance 2: onnxruntime-quantized MiniLM compiles for arm64 and runs under qemu
    with the host artifact's outputs. For activation-quantized models every run-time integer
    tensor (QuantizeLinear / DynamicQuantizeLinear codes and zero points, MatMulInteger
    accumulators) is a graph output too and must equal the host's bit for bit; each such node
    on each target must also reproduce the reference op applied to its own observed inputs
    (which covers the float scales of DynamicQuantizeLinear: they may differ from the host's
    by an ulp only because their float inputs do)."""
    import onnx

    from prequant_helpers import check_quant_nodes, expose_quant_tensors
    from qcompile.models import minilm

    feeds = minilm.tokenize(minilm.SENTENCES[:1], seq_len=32)
    shapes = {k: v.shape for k, v in feeds.items()}
    model = onnx.load(str(quantized_minilm[name]))
    names = expose_quant_tensors(model)
    onnx_path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(onnx_path))
    host = qcompile.compile(onnx_path, output=tmp_path / "host", shapes=shapes, verify=False)
    arm = qcompile.compile(onnx_path, output=tmp_path / "arm", shapes=shapes, target="arm64", verify=False)
    assert any(e["method"] == "imported" for e in arm.manifest["recipe"])
    want, got = host.load().run(feeds), qcompile.load(arm.path).run(feeds)
    assert set(got) == set(want) == set(names)
    integer = [n for n in names if np.issubdtype(want[n].dtype, np.integer)]
    assert (len(integer) > 0) == (name in ("dynamic", "qdq"))
    for n in integer:
        assert got[n].dtype == want[n].dtype, n
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    if integer:
        assert check_quant_nodes(model, got) == check_quant_nodes(model, want) > 0
    assert got["embedding"].shape == (1, 384)
    np.testing.assert_allclose(got["embedding"], want["embedding"], rtol=0, atol=_PREQUANT_ATOL)


# ---------------------------------------------------------------------------- sdot groundwork
def test_int8_sdot_gemm_is_exact_and_uses_sdot(tmp_path, arm64_env):
    import tvm
    from tvm import relax

    from qcompile.backends.arm64 import QemuModule, export_library
    from qcompile.backends.arm64.int8_gemm import int8_gemm_kernel, pack_sdot
    from qcompile.backends.llvm import relax_pipeline

    m, k, n = 16, 128, 48
    target = arm64_target("cortex-a55")
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((m, k), "int8"))
    b = relax.Var("b", relax.TensorType((n // 4, k // 4, 4, 4), "int8"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            gemm = bb.add_func(int8_gemm_kernel(m, k, n, target), "int8_gemm")
            c = bb.emit(relax.call_tir(gemm, [a, b], relax.TensorType((m, n), "int32")))
            out = bb.emit_output(relax.Tuple([c]))
        bb.emit_func_output(out)
    library = export_library(tvm.compile(bb.get(), target=target, relax_pipeline=relax_pipeline(target)),
                             tmp_path / "gemm.so")
    body = toolchain.function_bodies(toolchain.disassemble(library))["int8_gemm_compute_"]
    assert "sdot\tv" in body
    runner = toolchain.build_runner(arm64_env, tmp_path / "runner")
    rng = np.random.default_rng(SEED)
    x = rng.integers(-127, 128, (m, k)).astype(np.int8)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    got = QemuModule(library, runner, ["a", "b"], ["c"], runtime=arm64_env)({"a": x, "b": pack_sdot(w)})["c"]
    np.testing.assert_array_equal(got, x.astype(np.int32) @ w.astype(np.int32))


def test_sdot_kernel_refuses_targets_without_dotprod():
    import tvm

    from qcompile.backends.arm64.int8_gemm import int8_gemm_kernel

    no_dot = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    with pytest.raises(ValueError, match="dotprod"):
        int8_gemm_kernel(4, 16, 8, no_dot)
    with pytest.raises(ValueError, match="K % 4"):
        int8_gemm_kernel(4, 18, 8, arm64_target())
