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

from qcompile.frontends.onnx_frontend import load_onnx  # noqa: E402
from qcompile.interpreter import run  # noqa: E402
from qcompile.passes.fold_linear import FoldLinearPass  # noqa: E402
from qcompile.passes.quantize_activations import ActQuantConfig, QuantizeActivationsPass  # noqa: E402

TEST = 360
pytestmark = pytest.mark.slow  # training two models takes ~10-30 s


def _data():
    digits = sklearn_datasets.load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[TEST:], y[TEST:], x[:TEST], y[:TEST]


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.f1 = torch.nn.Linear(32 * 4 * 4, 64)
        self.f2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x.reshape(-1, 1, 8, 8)))
        x = torch.nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.c2(x))
        return self.f2(torch.relu(self.f1(x.flatten(1))))


def _train(model, x, y, epochs=15):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def trained(request, tmp_path_factory):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _data()
    model = _train(_mlp() if request.param == "mlp" else _CNN(), xtr, ytr)
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.onnx"
    torch.onnx.export(model, (torch.from_numpy(xte),), str(path), input_names=["x"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    graph = FoldLinearPass()(load_onnx(path)).graph
    return request.param, path, graph, xte, yte


def _acc(logits, y):
    return float((logits.argmax(axis=1) == y).mean() * 100)


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
