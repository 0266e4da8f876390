"""W8A8 / W4A8 on models trained here on scikit-learn's digits: accuracy stays near float.

An MLP (64-128-64-10) and a small CNN (conv-relu-pool-conv-relu-fc-fc) are trained in torch for
a few seconds, exported to ONNX and compiled with ``act_bits=8``. The Linear layers become
int8 GEMMs (the CNN's convolutions stay float: the pass rewrites Linear only). Targets: test
accuracy within 1 point of float at W8A8 and within 3 points at W4A8, both on the reference
interpreter and on the compiled host library (all marked slow: training takes seconds).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from digits_helpers import accuracy as _acc  # noqa: E402
from digits_helpers import train_and_export  # noqa: E402
from qcompile.interpreter import run  # noqa: E402
from qcompile.passes.quantize_activations import ActQuantConfig, QuantizeActivationsPass  # noqa: E402

pytestmark = pytest.mark.slow  # training two models takes ~10-30 s


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def trained(request, tmp_path_factory):
    path, graph, xte, yte, _ = train_and_export(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, path, graph, xte, yte


@pytest.mark.parametrize("bits,budget", [(8, 1.0), (4, 3.0)])
def test_interpreter_accuracy(trained, bits, budget):
    _, _, graph, x, y = trained
    base = _acc(run(graph, {"x": x})["logits"], y)
    q = QuantizeActivationsPass(ActQuantConfig(weight_bits=bits))(graph).graph
    assert sum(n.op == "Int8Linear" for n in q.nodes) >= 2
    acc = _acc(run(q, {"x": x})["logits"], y)
    assert base > 90 and acc >= base - budget, (base, acc)


@pytest.mark.parametrize("bits,budget", [(8, 1.0), (4, 3.0)])
def test_compiled_accuracy(trained, bits, budget, tmp_path):
    import qcompile

    name, path, graph, x, y = trained
    base = _acc(run(graph, {"x": x})["logits"], y)
    art = qcompile.compile(path, output=tmp_path / name, bits=bits, act_bits=8, verify=False)
    acc = _acc(art.load()(x), y)
    assert acc >= base - budget, (base, acc)


def test_w4a4_compiled_equals_reference_and_keeps_accuracy(trained, tmp_path):
    """--bits 4 --act-bits 4: 4-bit activation codes on the int8 GEMMs; the compiled library
    reproduces the reference interpreter, and accuracy stays within 3 points of float (as W4A8)."""
    import qcompile
    from qcompile.config import CompileConfig
    from qcompile.pipeline import optimize

    name, path, graph, x, y = trained
    base = _acc(run(graph, {"x": x})["logits"], y)
    q = QuantizeActivationsPass(ActQuantConfig(weight_bits=4, act_bits=4))(graph).graph
    assert all(n.attrs.get("bits") == 4 for n in q.nodes if n.op == "QuantizeAct")
    ref = run(q, {"x": x})["logits"]
    art = qcompile.compile(path, output=tmp_path / name, bits=4, act_bits=4, verify=False)
    got = art.load()(x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    acc4, acc8 = _acc(got, y), _acc(run(QuantizeActivationsPass(ActQuantConfig(weight_bits=4))(graph).graph,
                                        {"x": x})["logits"], y)
    print(f"digits {name}: float {base:.1f}, W4A8 {acc8:.1f}, W4A4 {acc4:.1f}")
    assert acc4 >= base - 3, (base, acc4)
    assert optimize(graph, CompileConfig(bits=4, act_bits=4))[1].metadata["quant_recipe"][0]["act_bits"] == 4
