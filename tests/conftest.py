"""Shared fixtures: tiny ONNX models built by hand, the MiniLM export, and MiniLM quantized by
onnxruntime's quantizers (the last two cached per session)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# compiles in tests run every stage (a cache hit would hide a monkeypatched pass or backend);
# tests/test_compile_cache.py passes its own cache directory
os.environ.setdefault("QCOMPILE_NO_CACHE", "1")


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


@pytest.fixture(scope="session")
def quantized_minilm(tmp_path_factory):
    """MiniLM quantized by onnxruntime's MatMulNBits (block 32, 128), QDQ static, dynamic."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from qcompile.models import minilm

    root = tmp_path_factory.mktemp("prequant")
    base = minilm.export_onnx(root / "minilm.onnx")
    paths = {}
    for block in (32, 128):
        q = MatMulNBitsQuantizer(onnx.load(str(base)), block_size=block, is_symmetric=False, bits=4)
        q.process()
        paths[f"nbits{block}"] = root / f"nbits{block}.onnx"
        q.model.save_model_to_file(str(paths[f"nbits{block}"]), False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            feeds = minilm.tokenize(minilm.SENTENCES[:4], seq_len=32)
            self.items = iter([{k: v[i : i + 1] for k, v in feeds.items()} for i in range(4)])

        def get_next(self):
            return next(self.items, None)

    paths["qdq"] = root / "qdq.onnx"
    quantize_static(str(base), str(paths["qdq"]), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    paths["dynamic"] = root / "dynamic.onnx"
    quantize_dynamic(str(base), str(paths["dynamic"]))
    return paths
