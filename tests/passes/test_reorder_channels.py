"""ReorderChannelsPass: folding through Linear/LN/elementwise/residual/attention, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from rotation_graphs import GraphBuilder, assert_same_outputs, random_feeds, structure

from qcompile.errors import InputError
from qcompile.passes.channel_spaces import find_spaces
from qcompile.passes.reorder_channels import ReorderChannelsPass, permute_axes, sorted_permutation

B, S = 2, 4


def _mlp(k=8, n=16, m=4):
    """x -> fc1 -> Gelu -> Mul(const[n]) -> fc2 -> out."""
    b = GraphBuilder({"x": (B, S, k)})
    h = b.linear("fc1", "x", k, n, (B, S))
    a = b.node("Gelu", "gelu", [h], "act", (B, S, n), approximate="none")
    s = b.node("Mul", "scale", [a, b.const("gain", (n,))], "scaled", (B, S, n))
    b.linear("fc2", s, n, m, (B, S))
    return b.build(["fc2.out"])


def test_sorted_permutation_and_permute_axes():
    mag = np.array([1.0, 5.0, 3.0, 0.0, 2.0, 9.0])
    np.testing.assert_array_equal(sorted_permutation(mag, 6), [5, 1, 2, 4, 0, 3])
    np.testing.assert_array_equal(sorted_permutation(mag, 3), [1, 2, 0, 5, 4, 3])
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    perm = np.array([5, 0, 1, 2, 3, 4])
    got = permute_axes(x, (0, 1), perm)
    np.testing.assert_array_equal(got.reshape(6, 4), x.reshape(6, 4)[perm])


def test_mlp_hidden_channels_sorted_and_folded():
    before = _mlp()
    feeds = random_feeds(before)
    result = ReorderChannelsPass(feeds)(before)
    assert result.modified
    after = result.graph
    assert [(n.op, n.name) for n in after.nodes] == [(n.op, n.name) for n in before.nodes]
    (space,) = after.metadata["reorder"]["spaces"]
    perm = np.array(space["perm"])
    assert space["consumers"] == ["fc2"] and space["producers"] == ["fc1"] and space["block"] == 16
    fc1, _, mul, fc2 = after.nodes
    np.testing.assert_array_equal(after.constants[fc1.inputs[1]], before.constants["fc1.w"][:, perm])
    np.testing.assert_array_equal(after.constants[fc1.inputs[2]], before.constants["fc1.b"][perm])
    np.testing.assert_array_equal(after.constants[mul.inputs[1]], before.constants["gain"][perm])
    np.testing.assert_array_equal(after.constants[fc2.inputs[1]], before.constants["fc2.w"][perm])
    from qcompile.interpreter import run

    act = run(after, feeds, keep_all=True)["scaled"]
    mag = np.abs(act).reshape(-1, 16).max(axis=0)
    assert np.all(np.diff(mag) <= 0)  # outliers first, contiguous
    assert_same_outputs(before, after, random_feeds(before, seed=7))


def _residual(stream_is_output=False):
    """fc0 -> LN -> [fc1 -> Gelu -> fc2] + residual -> LN -> fc3: one residual space."""
    b = GraphBuilder({"x": (B, S, 8)})
    h = b.linear("fc0", "x", 8, 12, (B, S))
    n1 = b.node("LayerNorm", "ln1", [h, b.const("g1", (12,)), b.const("b1", (12,))], "n1", (B, S, 12),
                axis=-1, epsilon=1e-5)
    f = b.linear("fc1", n1, 12, 24, (B, S))
    a = b.node("Gelu", "gelu", [f], "act", (B, S, 24), approximate="none")
    f2 = b.linear("fc2", a, 24, 12, (B, S))
    r = b.node("Add", "res", [f2, n1], "r", (B, S, 12))
    n2 = b.node("LayerNorm", "ln2", [r, b.const("g2", (12,)), b.const("b2", (12,))], "n2", (B, S, 12),
                axis=-1, epsilon=1e-5)
    b.linear("fc3", n2, 12, 4, (B, S))
    return b.build(["fc3.out"] + (["n2"] if stream_is_output else []))


def test_residual_stream_and_layernorm_share_one_permutation():
    before = _residual()
    spaces = {tuple(s.rows): s for s in find_spaces(before)}
    stream = spaces[("fc1", "fc3")]
    assert sorted(stream.cols) == ["fc0", "fc2"] and not stream.refusals
    assert sorted(k[0] for k in stream.consts) == ["ln1", "ln1", "ln2", "ln2"]
    after = ReorderChannelsPass(random_feeds(before, outlier_channels=(3,)))(before).graph
    assert [n.op for n in after.nodes] == [n.op for n in before.nodes]
    sizes = sorted(s["size"] for s in after.metadata["reorder"]["spaces"])
    assert sizes == [12, 24]
    assert_same_outputs(before, after, random_feeds(before, seed=3))


def test_graph_output_refuses_the_stream_only():
    before = _residual(stream_is_output=True)
    after = ReorderChannelsPass(random_feeds(before))(before).graph
    meta = after.metadata["reorder"]
    assert [s["size"] for s in meta["spaces"]] == [24]  # the FFN hidden space is still permuted
    refused = [r for r in meta["refused"] if r["consumers"] == ["fc1", "fc3"]]
    assert refused and "graph output" in refused[0]["reason"]
    assert_same_outputs(before, after, random_feeds(before, seed=3))


def test_nothing_changes_when_every_space_is_refused():
    b = GraphBuilder({"x": (B, S, 8)})
    b.linear("fc", "x", 8, 4, (B, S))
    before = b.build(["fc.out"])
    result = ReorderChannelsPass(random_feeds(before))(before)
    assert not result.modified and result.graph is before
    assert structure(result.graph) == structure(before)


def test_attention_permutes_within_heads():
    heads, d = 2, 8
    c = heads * d
    b = GraphBuilder({"x": (B, S, c)})
    q, k, v = (b.linear(n, "x", c, c, (B, S)) for n in ("q", "k", "v"))

    def split(name, t, perm):
        r = b.node("Reshape", f"{name}_split", [t], f"{name}4", (B, S, heads, d), shape=(B, S, heads, d))
        shape = tuple((B, S, heads, d)[p] for p in perm)
        return b.node("Transpose", f"{name}_t", [r], f"{name}t", shape, perm=perm)

    qt, kt, vt = split("q", q, (0, 2, 1, 3)), split("k", k, (0, 2, 3, 1)), split("v", v, (0, 2, 1, 3))
    scores = b.node("MatMul", "qk", [qt, kt], "scores", (B, heads, S, S))
    probs = b.node("Softmax", "softmax", [scores], "probs", (B, heads, S, S), axis=3)
    ctx = b.node("MatMul", "pv", [probs, vt], "ctx", (B, heads, S, d))
    back = b.node("Transpose", "ctx_t", [ctx], "ctxt", (B, S, heads, d), perm=(0, 2, 1, 3))
    merged = b.node("Reshape", "merge", [back], "merged", (B, S, c), shape=(B, S, c))
    b.linear("o", merged, c, c, (B, S))
    before = b.build(["o.out"])
    spaces = find_spaces(before)
    qk = next(s for s in spaces if sorted(s.cols) == ["k", "q"])
    vo = next(s for s in spaces if s.rows == ["o"])
    assert qk.block_size == d and vo.block_size == d and vo.cols == ["v"]
    after = ReorderChannelsPass(random_feeds(before))(before).graph
    (space,) = after.metadata["reorder"]["spaces"]  # Q/K holds no Linear input: left alone
    perm = np.array(space["perm"])
    assert space["consumers"] == ["o"] and np.all(perm // d == np.arange(c) // d)
    assert_same_outputs(before, after, random_feeds(before, seed=5))


def test_needs_calibration_feeds():
    with pytest.raises(InputError):
        ReorderChannelsPass([])
