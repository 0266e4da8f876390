"""Integer-only transformers: reference kernels, the integerize rules on a tiny BERT, and the
compiled module (bit-exact with the integer reference, no float op inside)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcompile import interpreter
from qcompile.interpreter_integer_nn import bit_length, int_layer_norm, int_row_quantize, int_softmax, isqrt
from qcompile.passes.integerize import BOUNDARY_OPS, IntegerizePass, float_value_ranges
from qcompile.passes.quantize_activations import ActQuantConfig, QuantizeActivationsPass

SEQ = 16


def test_isqrt_is_the_exact_floor_square_root():
    rng = np.random.default_rng(0)
    v = np.concatenate([np.arange(0, 300), rng.integers(0, 2**62, 5000), 2 ** np.arange(62) - 1,
                        2 ** np.arange(62)]).astype(np.int64)
    want = np.array([max(math.isqrt(int(x)), 1) for x in v])
    np.testing.assert_array_equal(isqrt(v), want)
    np.testing.assert_array_equal(bit_length(v[:300]), [int(x).bit_length() for x in v[:300]])


def test_int_layer_norm_tracks_the_float_layer_norm():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 384)) * 3 + 1
    gamma, beta = rng.uniform(0.5, 2, 384), rng.normal(size=384) * 0.1
    s_in, s_out, pre, out_shift = 2.0**-14, 2.0**-10, 2, 30
    q = int_layer_norm(np.rint(x / s_in).astype(np.int32), np.rint(gamma / s_out * 2.0 ** (out_shift - 22)).astype(np.int64),
                       np.rint(beta / s_out).astype(np.int64), pre, out_shift)
    ref = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True) * gamma + beta
    assert q.dtype == np.int32
    assert np.abs(q * s_out - ref).max() < 4 * s_out


def test_int_softmax_tracks_the_float_softmax_and_masks():
    from qcompile.interpreter_integer import dyadic
    from qcompile.passes.integerize_nn import EXP_STEPS, EXP_TABLE, MASK_FILL

    rng = np.random.default_rng(2)
    scale = 0.01
    x = np.rint(rng.normal(size=(3, 128)) * 3 / scale).astype(np.int32)
    x[1, 100:] = MASK_FILL
    table = np.rint(2.0**15 * np.exp(-np.arange(EXP_TABLE) / EXP_STEPS)).astype(np.int32)
    m, s = dyadic(scale * EXP_STEPS)
    p = int_softmax(x, table, int(m[0]), int(s[0])) / 2.0**15
    real = np.where(x == MASK_FILL, -np.inf, x * scale)
    ref = np.exp(real - real.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    assert np.abs(p - ref).max() < 2e-3
    assert np.all(p[1, 100:] == 0)


def _row_cases() -> np.ndarray:
    """int32 rows of 64: zero, exactly at the 7-bit edges, negative maxima, beyond the largest shift."""
    rng = np.random.default_rng(3)
    rows = [np.zeros(64), np.full(64, 127), np.full(64, 128), np.full(64, -129)]
    for top in (5, 200, 1000, 3000, 40000, 2**20):
        row = rng.integers(-top, top + 1, 64)
        row[rng.integers(64)] = -top if top % 2 else top
        rows.append(row)
    return np.stack(rows).astype(np.int32)


def test_int_row_quantize_gives_7_bit_codes_per_row_with_a_power_of_two():
    x, max_shift = _row_cases(), 6
    codes, mult = int_row_quantize(x, max_shift)
    assert codes.dtype == np.uint8 and mult.dtype == np.int32 and mult.shape == (len(x), 1)
    r = np.log2(mult[:, 0]).astype(int)
    assert np.array_equal(mult[:, 0], 1 << r) and r.min() == 0 and r.max() == max_shift
    top = np.abs(x.astype(np.int64)).max(-1)
    np.testing.assert_array_equal(r, np.clip([int(t).bit_length() - 7 for t in top], 0, max_shift))
    q = codes.astype(np.int64) - 128
    fits = top < 2 ** (7 + max_shift) - 2 ** (max_shift - 1)  # below the largest shift's saturation
    err = np.abs(q * mult - x)[fits]
    assert np.all(err <= (mult // 2)[fits]), "each code is the rounded row value"
    assert np.all(np.abs(q).max(-1)[(r > 0)] >= 64), "a shifted row uses its 7 bits"
    assert np.abs(q).max() <= 127


@pytest.mark.slow
def test_int_row_quantize_compiled_is_bit_exact():
    import tvm

    from qcompile.backends.llvm.target import build, host_target
    from qcompile.ir import Graph, Node, TensorType

    x = _row_cases()
    g = Graph("rows", ["x"], ["codes", "mult"], [], {}, {})
    g.add_value("x", TensorType(x.shape, "int32"))
    g.add_value("codes", TensorType(x.shape, "uint8"))
    g.add_value("mult", TensorType((len(x), 1), "int32"))
    g.nodes.append(Node("IntRowQuantize", "rq", ["x"], ["codes", "mult"], {"max_shift": 6}))
    vm = tvm.relax.VirtualMachine(build(g, host_target()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x))
    want = interpreter.run(g, {"x": x})
    np.testing.assert_array_equal(got[0].numpy(), want["codes"])
    np.testing.assert_array_equal(got[1].numpy(), want["mult"])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qcompile.driver import import_model
    from qcompile.models.minilm import INPUT_NAMES, sentence_encoder
    from qcompile.passes.fold_linear import FoldLinearPass

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=SEQ)
    model = sentence_encoder(transformers.BertModel(config).eval())
    feeds = _feeds(np.random.default_rng(0), 6)
    path = tmp_path_factory.mktemp("tiny_bert") / "tiny_bert.onnx"
    with torch.no_grad():
        torch.onnx.export(model, tuple(torch.from_numpy(feeds[n][:1]) for n in INPUT_NAMES), str(path),
                          opset_version=17, dynamo=False, input_names=list(INPUT_NAMES), output_names=["embedding"])
    graph, _ = import_model(str(path))
    return FoldLinearPass()(graph).graph, feeds


def _feeds(rng, count):
    ids = rng.integers(1, 64, (count, SEQ)).astype(np.int64)
    mask = np.ones((count, SEQ), np.int64)
    for i in range(count):
        mask[i, SEQ - 2 * i:] = 0 if i else 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((count, SEQ), np.int64)}


def _integer_graph(graph, feeds):
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(len(feeds["input_ids"]))]
    ranges = float_value_ranges(graph, samples)
    static = QuantizeActivationsPass(ActQuantConfig(weight_bits=8, mode="static", ranges=ranges))(graph).graph
    return IntegerizePass(ranges)(static).graph, samples


def test_tiny_bert_becomes_integer_only_and_stays_close(tiny_bert):
    graph, feeds = tiny_bert
    ig, samples = _integer_graph(graph, feeds)
    ops = {n.op for n in ig.nodes}
    assert {"IntLayerNorm", "IntSoftmax", "IntMatMul", "Lut", "IntLinear", "IntRowQuantize"} <= ops
    assert not ops & {"LayerNorm", "Softmax", "MatMul", "Erf", "Linear", "Int8Linear"}
    for node in ig.nodes:
        if node.op not in BOUNDARY_OPS:
            for name in [*node.inputs, *node.outputs]:
                assert not np.issubdtype(np.dtype(ig.type_of(name).dtype), np.floating), (node.name, name)
    for feed in samples:
        ref = interpreter.run(graph, feed)["embedding"][0]
        got = interpreter.run(ig, feed)["embedding"][0]
        assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.98


@pytest.mark.slow
def test_tiny_bert_compiled_is_bit_exact_and_float_free(tiny_bert):
    import tvm

    from qcompile.backends.integer_lowering import BOUNDARY_KERNELS, float_primfuncs
    from qcompile.backends.llvm.target import build, host_target, relax_pipeline
    from qcompile.backends.relax_lowering import lower_graph

    graph, feeds = tiny_bert
    ig, samples = _integer_graph(graph, feeds)
    target = host_target()
    floats = float_primfuncs(relax_pipeline(target)(lower_graph(ig, target)))
    assert all(name.startswith(BOUNDARY_KERNELS) for name in floats), floats
    vm = tvm.relax.VirtualMachine(build(ig, target), tvm.cpu())
    for feed in samples:
        got = vm["main"](*(tvm.runtime.tensor(feed[n]) for n in ig.inputs))[0].numpy()
        np.testing.assert_array_equal(got, interpreter.run(ig, feed)["embedding"])
