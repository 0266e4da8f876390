"""IntegerizePass: integer-only graphs, bit-exact compiled vs reference, no float in the lowered TIR.

Small hand-built models (an MLP with a residual Add, a CNN with max and average pooling) are
quantized W8A8 static and integerized; the host library must agree with the numpy integer
reference bit for bit, and the lowered module (after the Relax pipeline, before codegen) may
name a float dtype only in the two boundary kernels. The digits accuracy tests (slow) check the
issue's targets: within 1 point of float at W8A8 and 3 points at W4A8, integer-only.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tvm  # noqa: E402

from qcompile.backends.integer_lowering import BOUNDARY_KERNELS, float_primfuncs  # noqa: E402
from qcompile.backends.llvm import build, host_target, relax_pipeline  # noqa: E402
from qcompile.backends.relax_lowering import lower_graph  # noqa: E402
from qcompile.errors import InputError, UnsupportedOpError  # noqa: E402
from qcompile.frontends.onnx_frontend import load_onnx  # noqa: E402
from qcompile.interpreter import run  # noqa: E402
from qcompile.interpreter_integer import dyadic, fixed_point_multiply  # noqa: E402
from qcompile.passes.fold_linear import FoldLinearPass  # noqa: E402
from qcompile.passes.integerize import IntegerizePass, float_value_ranges  # noqa: E402
from qcompile.passes.quantize_activations import ActQuantConfig, QuantizeActivationsPass  # noqa: E402


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(32, 48), torch.nn.Linear(48, 48), torch.nn.Linear(48, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(h + self.b(h)))


class _PoolCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.nn.functional.avg_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.c2(x)), 2, padding=1)
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


_MODELS = {"residual": (_Residual, (16, 32)), "cnn": (_PoolCNN, (4, 2, 12, 12))}


def _graphs(kind, tmp_path, seed=0):
    torch.manual_seed(seed)
    model, shape = _MODELS[kind]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(model().eval(), (torch.from_numpy(x),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    graph = FoldLinearPass()(load_onnx(path)).graph
    ranges = float_value_ranges(graph, [{"x": x}])
    w8a8 = QuantizeActivationsPass(ActQuantConfig(mode="static", ranges=ranges))(graph).graph
    return graph, w8a8, IntegerizePass(ranges)(w8a8).graph, x


def test_fixed_point_multiply_matches_compiled_q_multiply_shift():
    rng = np.random.default_rng(0)
    mult = np.concatenate([[0.25, 0.5, 1.0, 3.0, 1e-12], rng.uniform(1e-6, 4.0, 251)])
    m, s = dyadic(mult)
    x = rng.integers(-(2**20), 2**20, mult.size).astype(np.int32)
    x[:5] = [-3, -1, 5, 7, 2**20]
    from tvm import te

    from qcompile.backends.integer_kernels import requantize_compute

    xs, ms, ss = (te.placeholder((mult.size,), "int32", name=n) for n in "xms")
    y = requantize_compute(xs, ms, ss, 0, "int32", 0, 0)
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([xs, ms, ss, y])}), target=host_target())
    out = tvm.runtime.tensor(np.zeros(mult.size, np.int32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, m, s)), out)
    want = fixed_point_multiply(x, m, s)
    np.testing.assert_array_equal(out.numpy(), want)
    assert list(want[:4]) == [-1, 0, 5, 21]  # -0.75 -> -1, -0.5 -> 0 (ties round up), 5, 21
    assert np.all(np.abs(want - x * mult) <= 0.5 + np.abs(x * mult) * 2.0**-30)


@pytest.mark.parametrize("kind", sorted(_MODELS))
def test_integer_graph_is_integer_and_close(kind, tmp_path):
    graph, w8a8, ig, x = _graphs(kind, tmp_path)
    for node in ig.nodes:
        if node.op not in ("QuantizeAct", "DequantizeLinear"):
            assert all(not ig.type_of(v).dtype.startswith("float") for v in [*node.inputs, *node.outputs] if v)
    ref, fq, got = (run(g, {"x": x})["y"] for g in (graph, w8a8, ig))
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 0.05 and err < 3 * np.linalg.norm(fq - ref) / np.linalg.norm(ref) + 0.01, err


@pytest.mark.parametrize("kind", sorted(_MODELS))
def test_compiled_bit_exact_and_no_float_tir(kind, tmp_path):
    _, _, ig, x = _graphs(kind, tmp_path)
    target = host_target()
    floats = float_primfuncs(relax_pipeline(target)(lower_graph(ig, target)))
    assert floats and all(name.startswith(BOUNDARY_KERNELS) for name in floats), floats
    vm = tvm.relax.VirtualMachine(build(ig, target), tvm.cpu())
    for seed in range(3):
        feed = x if seed == 0 else (np.random.default_rng(seed).standard_normal(x.shape) * 2).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(feed))[0].numpy()
        np.testing.assert_array_equal(got, run(ig, {"x": feed})["y"])


def test_refusals(tmp_path):
    graph, _, _, x = _graphs("residual", tmp_path)
    dynamic = QuantizeActivationsPass(ActQuantConfig(mode="dynamic"))(graph).graph
    with pytest.raises(InputError, match="static"):
        IntegerizePass({})(dynamic)
    ranges = float_value_ranges(graph, [{"x": x}])
    sig = graph.copy()
    relu = next(n for n in sig.nodes if n.op == "Relu")
    relu.op = "Log"  # no integer version (a nonlinearity such as Sigmoid becomes a lookup table)
    w8a8 = QuantizeActivationsPass(ActQuantConfig(mode="static", ranges=ranges))(sig).graph
    with pytest.raises(UnsupportedOpError, match="Log"):
        IntegerizePass(ranges)(w8a8)
    relu.op = "Sigmoid"
    ranges = float_value_ranges(sig, [{"x": x}])
    w8a8 = QuantizeActivationsPass(ActQuantConfig(mode="static", ranges=ranges))(sig).graph
    assert "Lut" in {n.op for n in IntegerizePass(ranges)(w8a8).graph.nodes}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_digits_accuracy_integer_only(kind, tmp_path):
    import qcompile
    from digits_helpers import accuracy, train_and_export

    path, graph, x, y, xtr = train_and_export(kind, tmp_path)
    base = accuracy(run(graph, {"x": x})["logits"], y)
    for bits, budget in ((8, 1.0), (4, 3.0)):
        art = qcompile.compile(path, output=tmp_path / f"{kind}{bits}", bits=bits, act_bits=8, integer_only=True,
                               calib_inputs={"x": xtr[: len(x)]}, eval_inputs={"x": x})
        got = art.load()(x)
        acc = accuracy(got, y)
        assert base > 90 and acc >= base - budget, (bits, base, acc)
        assert art.manifest["config"]["integer_only"]


def test_cli_integer_only(tmp_path, mlp_onnx):
    import json

    from qcompile.cli import main
    from qcompile.config import CompileConfig

    with pytest.raises(InputError, match="--integer-only needs --act-bits 8"):
        CompileConfig(integer_only=True)
    with pytest.raises(InputError, match="--integer-only needs --act-bits 8"):
        CompileConfig(bits=4, act_bits=4, integer_only=True)
    with pytest.raises(InputError, match="--act-bits 4 needs --bits 8 or 4"):
        CompileConfig(bits=2, act_bits=4)
    with pytest.raises(InputError, match="--act-bits must be 4, 8 or 16"):
        CompileConfig(act_bits=6)
    out = tmp_path / "art"
    assert main([str(mlp_onnx), "-o", str(out), "--bits", "8", "--act-bits", "8", "--integer-only", "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["integer_only"] and manifest["config"]["act_bits"] == 8
    acc = manifest["accuracy"]["y"]
    assert acc["compiled_vs_fake_quant"]["max_abs_error"] == 0.0, acc  # compiled == integer reference
