"""The LUT GEMV in the compile path (backends/lut_lowering.py): selection, record, numerics.

A batch-1 MLP (x[1, 256] -> QLinear 128 -> Relu -> QLinear 64) compiled with 2- and 4-bit
weights and ``--gemv-kernel lut`` (auto prefers the VNNI GEMV on AVX-512 VNNI hosts:
tests/backends/test_gemv_kernels.py) must pick the LUT kernel for both layers, record it in the manifest's recipe and the
report, and match the numpy reference interpreter of the quantized graph within the LUT's
table-rounding bound (propagated through the second layer). ``--gemv-kernel dequant`` keeps
the dequant GEMV. The aarch64 build (skipped without the toolchain unless
``QCOMPILE_REQUIRE_ARM64=1``) must use ``tbl`` in model.so and match under qemu.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tvm

import qcompile
from qcompile import quant
from qcompile.backends import lut_kernels as LK
from qcompile.backends.lut_lowering import METADATA_KEY, choose_gemv_kernels
from qcompile.backends.relax_lowering import lower_graph
from qcompile.cli import main as cli_main
from qcompile.config import CompileConfig
from qcompile.driver import import_model
from qcompile.errors import InputError
from qcompile.interpreter import run
from qcompile.pipeline import optimize
from qcompile.schedules.lut import lut_isa

from conftest import make_mlp_onnx

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})
K, HIDDEN, N, GROUP = 256, 128, 64, 64
FLOAT_ATOL = 1e-4  # float summation order, relative to max |y|
LUT_ATOL = 1e-3  # compiled vs numpy LUT reference, relative to max |y|


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_mlp_onnx(tmp_path_factory.mktemp("lut_mlp") / "mlp.onnx", in_dim=K, hidden=HIDDEN, out_dim=N,
                         batch=1)


def _feeds():
    return {"x": np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)}


def _quant_graph(path, batch_shape=None, **config):
    graph, _ = import_model(path, {"x": batch_shape} if batch_shape else None)
    return optimize(graph, CompileConfig(**config))[1]


def _compile(path, out, **config):
    art = qcompile.compile(path, output=out, verify=False, group_size=GROUP, **config)
    report = json.loads((Path(out) / "report.json").read_text())
    return art, report


def _dequant(g, node):
    bits, gs = int(node.attrs["bits"]), int(node.attrs.get("group_size", 0))
    k = g.values[node.inputs[1]].quant.logical_shape[0]
    zeros = g.constants[node.inputs[3]] if node.inputs[3] else None
    return quant.dequantize_weight(g.constants[node.inputs[1]], g.constants[node.inputs[2]], zeros, bits, gs, k)


def _mlp_bound(g, feeds):
    """(reference y, bound on |LUT y - reference y|): layer-1 table rounding, through Relu and
    |W2|, plus layer 2's own table rounding on inputs up to |h| + bound1."""
    fc1, fc2 = [n for n in g.nodes if n.op == "QLinear"]
    env = run(g, feeds, keep_all=True)
    bits = int(fc1.attrs["bits"])
    bound1 = LK.table_error_bound(env[fc1.inputs[0]], g.constants[fc1.inputs[2]], bits, GROUP)
    h_max = np.abs(env[fc2.inputs[0]]) + bound1
    bound2 = LK.table_error_bound(h_max.astype(np.float32), g.constants[fc2.inputs[2]], bits, GROUP)
    y = env[g.outputs[0]]
    return y, bound2 + bound1 @ np.abs(_dequant(g, fc2)) + FLOAT_ATOL * np.abs(y).max()


def _lut_mlp(g, feeds):
    """The MLP through :func:`lut_kernels.lut_gemv_reference` (the kernel's integers exactly)."""
    h = feeds["x"]
    for node in g.nodes:
        if node.op == "Relu":
            h = np.maximum(h, 0)
            continue
        qweight, scales, zeros, bias = (g.constants[name] if name else None for name in node.inputs[1:5])
        h = LK.lut_gemv_reference(h, qweight, scales, zeros, int(node.attrs["bits"]), GROUP, bias)
    return h


def _kernel_names(g) -> list[str]:
    return [gv.name_hint for gv in lower_graph(g, HOST).get_global_vars()]


# ---------------------------------------------------------------------------- host
@pytest.mark.parametrize("bits", [2, 4])
def test_batch1_mlp_selects_lut_and_matches_within_table_bound(tmp_path, mlp, bits):
    art, report = _compile(mlp, tmp_path / "out", bits=bits, gemv_kernel="lut")
    recipe = [e for e in art.manifest["recipe"] if e["op"] == "QLinear"]
    assert len(recipe) == 2 and all(e["gemv_kernel"] == "lut" for e in recipe)
    assert [d["kernel"] for d in report["gemv_kernels"]] == ["lut", "lut"]
    assert {(d["k"], d["n"]) for d in report["gemv_kernels"]} == {(K, HIDDEN), (HIDDEN, N)}
    assert art.manifest["config"]["gemv_kernel"] == "lut"
    g = _quant_graph(mlp, bits=bits, group_size=GROUP)
    names = _kernel_names(choose_gemv_kernels(g, HOST, "lut")[0])
    assert sum(n.startswith("lut_gemv") for n in names) == 2 and not any(n.startswith("qlinear") for n in names)
    feeds = _feeds()
    want, bound = _mlp_bound(g, feeds)
    got = art.load()(**feeds)
    err = np.abs(got - want)
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 0  # table rounding: not the exact dequant GEMV
    # tighter: the numpy LUT reference up to float summation order (and a rare rounding tie
    # of a layer-2 table entry flipped by it)
    np.testing.assert_allclose(got, _lut_mlp(g, feeds), rtol=0, atol=LUT_ATOL * np.abs(want).max())


def test_dequant_mode_keeps_the_dequant_gemv(tmp_path, mlp):
    art, report = _compile(mlp, tmp_path / "out", bits=4, gemv_kernel="dequant")
    recipe = [e for e in art.manifest["recipe"] if e["op"] == "QLinear"]
    assert all(e["gemv_kernel"] == "dequant" and e["gemv_reason"] == "--gemv-kernel dequant" for e in recipe)
    g = _quant_graph(mlp, bits=4, group_size=GROUP)
    names = _kernel_names(choose_gemv_kernels(g, HOST, "dequant")[0])
    assert not any(n.startswith("lut_gemv") for n in names) and sum(n.startswith("qlinear") for n in names) == 2
    feeds = _feeds()
    want = run(g, feeds)[g.outputs[0]]
    np.testing.assert_allclose(art.load()(**feeds), want, rtol=0, atol=FLOAT_ATOL * np.abs(want).max())


def test_only_batch1_qlinears_get_a_decision(tmp_path):
    g = _quant_graph(make_mlp_onnx(tmp_path / "b4.onnx", in_dim=K, hidden=HIDDEN, out_dim=N, batch=4),
                     bits=4, group_size=GROUP)
    out, decisions = choose_gemv_kernels(g, HOST, "lut")
    assert decisions == [] and METADATA_KEY not in out.metadata
    assert not any(n.startswith("lut_gemv") for n in _kernel_names(out))


def test_unsupported_shapes_fall_back_with_a_reason(tmp_path):
    # n = 40 is no multiple of the rows of one shuffle vector (16 AVX2, 32 AVX-512)
    if 40 % lut_isa(HOST).rows == 0:
        pytest.skip(f"{lut_isa(HOST).name} takes n = 40")
    path = make_mlp_onnx(tmp_path / "odd.onnx", in_dim=K, hidden=40, out_dim=N, batch=1)
    g = _quant_graph(path, bits=4, group_size=8)
    out, decisions = choose_gemv_kernels(g, HOST, "lut")
    assert [(d["n"], d["kernel"]) for d in decisions] == [(40, "dequant"), (N, "lut")]
    assert "multiple of" in decisions[0]["reason"]
    recipe = {e["node"]: e for e in out.metadata["quant_recipe"]}
    assert recipe[decisions[0]["node"]]["gemv_reason"] == decisions[0]["reason"]
    names = _kernel_names(out)
    assert sum(n.startswith("lut_gemv") for n in names) == 1 and sum(n.startswith("qlinear") for n in names) == 1


def test_gemv_kernel_option_is_checked(tmp_path, mlp, capsys):
    with pytest.raises(InputError, match="--gemv-kernel must be auto, vnni, lut or dequant"):
        CompileConfig(gemv_kernel="fast")
    with pytest.raises(InputError, match="--gemv-kernel must be one of"):
        choose_gemv_kernels(_quant_graph(mlp, bits=4, group_size=GROUP), HOST, "fast")
    with pytest.raises(SystemExit):
        cli_main(["compile", str(mlp), "-o", str(tmp_path / "o"), "--gemv-kernel", "fast"])
    assert "--gemv-kernel" in capsys.readouterr().err


# ---------------------------------------------------------------------------- aarch64
def _arm64_or_skip():
    from arm64_helpers import arm64_runtime_or_skip

    return arm64_runtime_or_skip()


def test_arm64_uses_tbl_and_matches_under_qemu(tmp_path, mlp):
    _arm64_or_skip()
    from qcompile.backends.arm64 import toolchain

    art, report = _compile(mlp, tmp_path / "arm", bits=4, target="arm64")
    assert [d["kernel"] for d in report["gemv_kernels"]] == ["lut", "lut"]
    bodies = toolchain.function_bodies(toolchain.disassemble(art.path / "model.so"))
    lut_bodies = [b for name, b in bodies.items() if name.startswith("lut_gemv")]
    assert len(lut_bodies) == 2 and all(re.search(r"\btbl\s+v\d+\.16b", b) for b in lut_bodies)
    feeds = _feeds()
    g = _quant_graph(mlp, bits=4, group_size=GROUP)
    want, bound = _mlp_bound(g, feeds)
    got = qcompile.load(art.path)(**feeds)
    err = np.abs(got - want)
    assert (err <= bound).all(), float((err - bound).max())
    np.testing.assert_allclose(got, _lut_mlp(g, feeds), rtol=0, atol=LUT_ATOL * np.abs(want).max())
