"""Models trained here on scikit-learn's bundled digits data (shared by the accuracy tests).

An MLP (64-128-64-10) and a small CNN (conv-relu-pool-conv-relu-fc-fc) train in torch for a
few seconds (seeded), are exported to ONNX (input "x" [360, 64], output "logits") and loaded
and folded into the IR. Test split: the first ``TEST`` samples of a seeded permutation.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn import datasets

from qcompile.frontends.onnx_frontend import load_onnx
from qcompile.passes.fold_linear import FoldLinearPass

__all__ = ["TEST", "data", "mlp", "CNN", "train", "accuracy", "train_and_export"]

TEST = 360


def data():
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], float32."""
    digits = datasets.load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[TEST:], y[TEST:], x[:TEST], y[:TEST]


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


class CNN(torch.nn.Module):
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


def train(model, x, y, epochs=15):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(logits, y) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(axis=1) == y).mean() * 100)


def train_and_export(kind: str, directory):
    """Train ``kind`` ("mlp" | "cnn"); return (onnx path, folded IR graph, x_test, y_test, x_train)."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = data()
    model = train(mlp() if kind == "mlp" else CNN(), xtr, ytr)
    path = directory / f"{kind}.onnx"
    torch.onnx.export(model, (torch.from_numpy(xte),), str(path), input_names=["x"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    return path, FoldLinearPass()(load_onnx(path)).graph, xte, yte, xtr
