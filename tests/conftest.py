"""Shared fixtures: tiny ONNX models built by hand, and the MiniLM export (cached per session)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def make_mlp_onnx(path, in_dim=64, hidden=128, out_dim=32, batch=4, seed=0, dynamic_batch=False):
    """x -> MatMul+Add -> Relu -> Gemm(transB) -> out: a small MLP as exporters write it."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((in_dim, hidden)).astype(np.float32) / np.float32(np.sqrt(in_dim))
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = rng.standard_normal((out_dim, hidden)).astype(np.float32) / np.float32(np.sqrt(hidden))
    b2 = (rng.standard_normal(out_dim) * 0.1).astype(np.float32)
    batch_dim = "batch" if dynamic_batch else batch
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1_matmul"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_add"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("Gemm", ["h2", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, out_dim])],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


@pytest.fixture
def mlp_onnx(tmp_path):
    return make_mlp_onnx(tmp_path / "mlp.onnx")


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory):
    from qcompile.models import minilm

    return minilm.export_onnx(tmp_path_factory.mktemp("minilm") / "minilm.onnx", opset=17)


@pytest.fixture(scope="session")
def minilm_feeds():
    from qcompile.models import minilm

    return minilm.tokenize(minilm.SENTENCES, 128)
