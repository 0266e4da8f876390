"""End to end on the real all-MiniLM-L6-v2 (the issue's acceptance figures). Slow."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import qcompile
from qcompile.errors import ShapeError
from qcompile.models import minilm

pytestmark = pytest.mark.slow

BATCH_SHAPES = {name: (len(minilm.SENTENCES), 128) for name in minilm.INPUT_NAMES}


@pytest.fixture(scope="module")
def reference(minilm_onnx, minilm_feeds):
    sess = ort.InferenceSession(str(minilm_onnx), providers=["CPUExecutionProvider"])
    return sess.run(None, minilm_feeds)[0]


def _cosine(a, b):
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _compile_and_run(tmp_path, minilm_onnx, feeds, **kw):
    art = qcompile.compile(minilm_onnx, output=tmp_path / "art", shapes=BATCH_SHAPES, eval_inputs=feeds, **kw)
    return art, qcompile.load(art.path)(**feeds)


def test_float_matches_onnxruntime(tmp_path, minilm_onnx, minilm_feeds, reference):
    _, got = _compile_and_run(tmp_path, minilm_onnx, minilm_feeds, bits=16)
    rel = np.max(np.abs(got - reference)) / np.max(np.abs(reference))
    assert rel <= 1e-4, rel


def test_w8_per_channel_cosine(tmp_path, minilm_onnx, minilm_feeds, reference):
    _, got = _compile_and_run(tmp_path, minilm_onnx, minilm_feeds, bits=8)
    assert _cosine(reference, got) >= 0.999


def test_w4_g32_cosine_and_size(tmp_path, minilm_onnx, minilm_feeds, reference):
    art, got = _compile_and_run(tmp_path, minilm_onnx, minilm_feeds, bits=4, group_size=32)
    assert _cosine(reference, got) >= 0.975
    assert art.manifest["sizes"]["weights_ratio"] <= 0.3
    recipe = art.manifest["recipe"]
    assert sum(r["op"] == "QLinear" for r in recipe) == 36
    assert all(r["bits"] == 4 and r["group_size"] == 32 for r in recipe if r["op"] == "QLinear")


def test_dynamic_axes_need_binding(minilm_onnx):
    from qcompile.frontends.onnx_frontend import load_onnx

    with pytest.raises(ShapeError, match="input_ids.*batch"):
        load_onnx(minilm_onnx)


def test_w8a8_integer_only_is_bit_exact_float_free_and_close(tmp_path, minilm_onnx, minilm_feeds, reference):
    """Acceptance of the integer-only path on MiniLM: compiled == numpy integer reference bit for
    bit, no float op outside the two boundary kernels, embeddings close to float."""
    from qcompile.backends.integer_lowering import BOUNDARY_KERNELS, float_primfuncs
    from qcompile.backends.llvm.target import host_target, relax_pipeline
    from qcompile.backends.relax_lowering import lower_graph
    from qcompile.config import CompileConfig
    from qcompile.pipeline import optimize

    count = 8
    feeds = {k: v[:count] for k, v in minilm_feeds.items()}
    shapes = {name: (count, 128) for name in minilm.INPUT_NAMES}
    calib = minilm.tokenize(minilm.CALIB_SENTENCES[:16], 128)
    options = dict(bits=8, act_bits=8, integer_only=True, shapes=shapes)
    art = qcompile.compile(minilm_onnx, output=tmp_path / "art", eval_inputs=feeds, calib_inputs=calib, **options)
    check = art.manifest["accuracy"]["embedding"]
    assert check["compiled_vs_fake_quant"]["max_abs_error"] == 0.0
    got = qcompile.load(art.path)(**feeds)
    assert _cosine(reference[:count], got) >= 0.994  # 32 sentences: 0.9962 (per-row codes, alpha 0.6)

    from qcompile.driver import import_model

    graph, _ = import_model(str(minilm_onnx), shapes=shapes)
    _, ig = optimize(graph, CompileConfig(**options), calib)
    assert not {n.op for n in ig.nodes} & {"LayerNorm", "Softmax", "MatMul", "Erf", "Linear", "Int8Linear"}
    target = host_target()
    floats = float_primfuncs(relax_pipeline(target)(lower_graph(ig, target)))
    assert all(name.startswith(BOUNDARY_KERNELS) for name in floats), floats
