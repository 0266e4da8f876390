"""passes.gptq: lower Hessian-norm error than RTN, valid QLinear layout, pass wiring."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.errors import InputError
from qcompile.interpreter import run
from qcompile.ir import Graph, Node, TensorType, verify
from qcompile.passes import QuantizeWeightsPass, WeightQuantConfig
from qcompile.passes.calibrate import collect_statistics
from qcompile.passes.gptq import GPTQPass, GPTQRoundWeightsPass, gptq_quantize, hessian_error, refit_groups
from qcompile.passes.rtn import quantize_and_pack
from qcompile.quant import pack_codes, unpack_codes

K, N, T = 256, 48, 1024


def _correlated(seed=0):
    """Inputs with strongly correlated channels and a few large ones, as real activations."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) / np.sqrt(K)
    x = rng.standard_normal((T, K)) @ mix + 0.05 * rng.standard_normal((T, K))
    x[:, :4] *= 8
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    return x.astype(np.float32), w


@pytest.mark.parametrize("bits,group,sym,act_order", [
    (4, 32, False, False), (4, 128, False, True), (3, 0, False, False), (2, 64, True, True), (8, 0, True, False),
])
def test_gptq_beats_rtn_in_hessian_norm(bits, group, sym, act_order):
    x, w = _correlated()
    h = x.astype(np.float64).T @ x / T
    rtn = quantize_and_pack(w, bits, group, sym, clip_search=True)
    gq = gptq_quantize(w, h, bits, group, sym, True, act_order=act_order)  # both with clip search
    assert hessian_error(w, gq.dequantize(), h) < 0.7 * hessian_error(w, rtn.dequantize(), h)
    # the layout is QLinear's: codes in range, scales/zeros [N, G]
    groups = K // (group or K)
    assert gq.scales.shape == (N, groups) and (gq.zeros is None) == sym
    assert gq.packed.shape == (N, (K * bits + 7) // 8)
    np.testing.assert_array_equal(pack_codes(unpack_codes(gq.packed, bits, K), bits), gq.packed)


def test_dead_inputs_and_bad_hessian():
    x, w = _correlated(1)
    x[:, 5] = 0.0
    h = x.astype(np.float64).T @ x / T
    gq = gptq_quantize(w, h, 4, 32, False)
    assert np.isfinite(gq.dequantize()).all()
    with pytest.raises(InputError, match="Hessian"):
        gptq_quantize(w, h[:-1, :-1], 4, 32, False, name="fc")
    with pytest.raises(InputError, match="group_size"):
        gptq_quantize(w, h, 4, 48, False)



def test_refit_groups_lowers_the_error_and_keeps_the_codes():
    x, w = _correlated(3)
    h = x.astype(np.float64).T @ x / T
    rtn = quantize_and_pack(w, 2, 64, False, clip_search=True)
    codes = unpack_codes(rtn.packed, 2, K)
    scales, zeros = refit_groups(w, h, codes, 64, rtn.scales, rtn.zeros, damp=0.0)
    refit = ((codes.astype(np.float32) - np.repeat(zeros, 64, axis=1)) * np.repeat(scales, 64, axis=1)).T
    assert scales.shape == rtn.scales.shape and np.all(scales > 0)
    assert hessian_error(w, refit, h) < 0.9 * hessian_error(w, rtn.dequantize(), h)


@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_refits_only_float_zero_grids(bits):
    """2-bit asymmetric GPTQ refits (scale, zero) (fractional zeros, lower error than its own
    grid before the refit); 4-bit keeps integer zero points."""
    x, w = _correlated(4)
    h = x.astype(np.float64).T @ x / T
    gq = gptq_quantize(w, h, bits, 64, False, True, act_order=True)
    assert np.all(gq.zeros == np.rint(gq.zeros)) == (bits == 4)

def _mlp() -> Graph:
    rng = np.random.default_rng(2)
    g = Graph("mlp", ["x"], ["y"], [], {}, {})
    g.add_value("x", TensorType((T, K), "float32"))
    g.add_constant("w1", rng.standard_normal((K, 64)).astype(np.float32) * 0.1)
    g.add_constant("b1", rng.standard_normal(64).astype(np.float32))
    g.add_constant("w2", rng.standard_normal((64, 16)).astype(np.float32) * 0.1)
    for name, shape in [("h", (T, 64)), ("r", (T, 64)), ("y", (T, 16))]:
        g.add_value(name, TensorType(shape, "float32"))
    g.nodes = [Node("Linear", "fc1", ["x", "w1", "b1"], ["h"]), Node("Relu", "relu", ["h"], ["r"]),
               Node("Linear", "fc2", ["r", "w2"], ["y"])]
    verify(g)
    return g


def test_gptq_pass_same_structure_as_rtn_and_lower_output_error():
    g = _mlp()
    x, _ = _correlated(3)
    feeds = {"x": x}
    stats = collect_statistics(g, [feeds])
    cfg = WeightQuantConfig(bits=3, group_size=32)
    rtn_g = QuantizeWeightsPass(cfg)(g).graph
    result = GPTQPass(cfg, stats)(g)
    assert result.modified
    gq = result.graph
    assert [(n.op, n.name, n.attrs) for n in gq.nodes] == [(n.op, n.name, n.attrs) for n in rtn_g.nodes]
    assert [r["method"] for r in gq.metadata["quant_recipe"]] == ["gptq", "gptq"]
    assert gq.values[gq.nodes[0].inputs[1]].quant.method == "gptq"
    ref = run(g, feeds)["y"]
    err = lambda q: float(np.sum((run(q, feeds)["y"] - ref) ** 2))  # noqa: E731
    assert err(gq) < err(rtn_g)


def test_gptq_pass_without_stats_falls_back_to_rtn():
    from qcompile.passes.calibrate import Stats

    g = _mlp()
    cfg = WeightQuantConfig(bits=4)
    gq = GPTQPass(cfg, Stats())(g).graph
    rtn_g = QuantizeWeightsPass(cfg)(g).graph
    assert [r["method"] for r in gq.metadata["quant_recipe"]] == ["rtn", "rtn"]
    for name in rtn_g.constants:
        np.testing.assert_array_equal(gq.constants[name], rtn_g.constants[name])


@pytest.mark.parametrize("bits", [4, 8])
def test_pinned_extremes_survive_absmax_requantization(bits):
    from qcompile.passes.quantize_activations import quantize_weight_per_channel

    x, w = _correlated(4)
    h = x.astype(np.float64).T @ x / T
    wq = gptq_quantize(w, h, bits, 0, True, True, pin_extremes=True).dequantize()
    qmax = 2 ** (bits - 1) - 1
    q, scale = quantize_weight_per_channel(wq, bits, clip_search=True)
    np.testing.assert_allclose(q * scale, wq, rtol=1e-6, atol=1e-7)  # the W8A8/W4A8 grid reproduces GPTQ
    assert np.all(np.abs(q).max(axis=0) == qmax)
    rtn_q, rtn_s = quantize_weight_per_channel(w, bits, clip_search=True)
    assert hessian_error(w, wq, h) < 0.7 * hessian_error(w, rtn_q * rtn_s, h)
    with pytest.raises(InputError, match="per-channel"):
        gptq_quantize(w, h, bits, 32, True, pin_extremes=True, name="fc")


def test_round_weights_pass_keeps_float_linears_and_lowers_output_error():
    from qcompile.passes.quantize_activations import ActQuantConfig, QuantizeActivationsPass

    g = _mlp()
    feeds = {"x": _correlated(3)[0]}
    result = GPTQRoundWeightsPass(collect_statistics(g, [feeds]), 4)(g)
    assert result.modified and result.graph.metadata["gptq_rounded"] == ["fc1", "fc2"]
    assert [(n.op, n.name) for n in result.graph.nodes] == [(n.op, n.name) for n in g.nodes]
    act = ActQuantConfig(weight_bits=4)
    ref = run(g, feeds)["y"]
    err = lambda q: float(np.sum((run(QuantizeActivationsPass(act)(q).graph, feeds)["y"] - ref) ** 2))  # noqa: E731
    assert err(result.graph) < err(g)


def _minilm(onnx_path, batch):
    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.models import minilm
    from qcompile.passes import FoldLinearPass

    graph = load_onnx(onnx_path, shapes={n: (batch, 128) for n in minilm.INPUT_NAMES})
    return FoldLinearPass()(graph).graph


@pytest.mark.slow
def test_minilm_w4_g128_gptq_beats_rtn_held_out(minilm_onnx, minilm_feeds):
    """Calibrate on sentences 0-15, measure the mean embedding cosine on sentences 16-31."""
    from qcompile.metrics import mean_cosine

    calib = {k: v[:16] for k, v in minilm_feeds.items()}
    held_out = {k: v[16:32] for k, v in minilm_feeds.items()}
    g = _minilm(minilm_onnx, 16)
    ref = run(g, held_out)["embedding"]
    stats = collect_statistics(g, [calib])
    assert stats.masks and all(v > 0 for v in stats.masks.values())  # the -3.4e38 mask fill is recognized
    cfg = WeightQuantConfig(bits=4, group_size=128)
    rtn = mean_cosine(ref, run(QuantizeWeightsPass(cfg)(g).graph, held_out)["embedding"])
    gptq = mean_cosine(ref, run(GPTQPass(cfg, stats, act_order=True)(g).graph, held_out)["embedding"])
    print(f"MiniLM W4 g128 held-out cosine: RTN {rtn:.5f}, GPTQ {gptq:.5f}")
    # in-sample (calibrated and measured on all 32 sentences) GPTQ reaches 0.998 vs RTN 0.964;
    # held out, 16 short sentences (~200 real tokens) give a rank-deficient Hessian: 0.975
    assert gptq > rtn and gptq > 0.97
