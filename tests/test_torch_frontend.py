"""torch.export path: a Linear/LayerNorm/GELU/residual module matches eager PyTorch."""

from __future__ import annotations

import numpy as np
import torch

import qcompile


class Block(torch.nn.Module):
    def __init__(self, dim=64, hidden=256):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def _compile_block(tmp_path, bits):
    torch.manual_seed(0)
    module = Block().eval()
    x = torch.randn(2, 16, 64)
    art = qcompile.compile(module, example_inputs=(x,), output=tmp_path / f"w{bits}", bits=bits)
    with torch.no_grad():
        return art.load()(x.numpy()), module(x).numpy()


def test_torch_module_matches_eager(tmp_path):
    got, ref = _compile_block(tmp_path, 16)
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-4


def test_torch_module_quantized(tmp_path):
    got, ref = _compile_block(tmp_path, 8)
    cos = float(np.sum(got * ref) / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert cos > 0.999
