"""HadamardRotationPass: online and offline rewrites on tiny graphs, refusals, numerics, lowering."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.hadamard import hadamard
from qcompile.interpreter import run
from qcompile.passes.hadamard_rotation import HadamardRotationPass

from rotation_graphs import GraphBuilder, assert_same_outputs, random_feeds, structure

B, S = 2, 4


def _mlp(k=24, n=48, m=8):
    """x -> fc1 -> Gelu -> fc2 -> out."""
    b = GraphBuilder({"x": (B, S, k)})
    h = b.linear("fc1", "x", k, n, (B, S))
    a = b.node("Gelu", "gelu", [h], "act", (B, S, n), approximate="none")
    b.linear("fc2", a, n, m, (B, S))
    return b.build(["fc2.out"])


def test_online_rotation_structure_and_weights():
    before = _mlp()
    result = HadamardRotationPass()(before)
    assert result.modified
    after = result.graph
    assert [(op, name) for op, name, *_ in structure(after)] == [
        ("Hadamard", "fc1/hadamard"), ("Linear", "fc1"), ("Gelu", "gelu"),
        ("Hadamard", "fc2/hadamard"), ("Linear", "fc2"),
    ]
    had = after.nodes[0]
    assert had.attrs == {"size": 24, "axis": -1} and had.inputs == ["x"]
    assert after.nodes[1].inputs[0] == had.outputs[0]
    w1 = after.constants[after.nodes[1].inputs[1]]
    np.testing.assert_allclose(w1, hadamard(24).T @ before.constants["fc1.w"], atol=1e-6)
    np.testing.assert_array_equal(after.constants[after.nodes[1].inputs[2]], before.constants["fc1.b"])
    assert [r["mode"] for r in after.metadata["hadamard"]] == ["online", "online"]
    assert_same_outputs(before, after, random_feeds(before))


def test_layers_option_selects_by_name():
    after = HadamardRotationPass(layers={"fc2"})(_mlp()).graph
    assert [n.op for n in after.nodes] == ["Linear", "Gelu", "Hadamard", "Linear"]


def test_shared_input_gets_one_hadamard():
    b = GraphBuilder({"x": (B, S, 32)})
    q = b.linear("q", "x", 32, 16, (B, S))
    k = b.linear("k", "x", 32, 16, (B, S))
    b.node("Add", "add", [q, k], "out", (B, S, 16))
    before = b.build(["out"])
    after = HadamardRotationPass()(before).graph
    assert [n.op for n in after.nodes] == ["Hadamard", "Linear", "Linear", "Add"]
    assert after.nodes[1].inputs[0] == after.nodes[2].inputs[0] == after.nodes[0].outputs[0]
    assert_same_outputs(before, after, random_feeds(before))


def test_offline_fold_through_scalar_mul():
    """fc1 -> Mul(scalar) -> fc2: R folds into fc1 columns/bias and fc2 rows; no new op."""
    b = GraphBuilder({"x": (B, S, 20)})
    h = b.linear("fc1", "x", 20, 48, (B, S))
    m = b.node("Mul", "scale", [h, b.const("half", array=np.float32(0.5))], "scaled", (B, S, 48))
    b.linear("fc2", m, 48, 8, (B, S))
    before = b.build(["fc2.out"])
    after = HadamardRotationPass(layers={"fc2"})(before).graph
    assert [n.op for n in after.nodes] == [n.op for n in before.nodes]
    fc1, fc2 = after.nodes[0], after.nodes[2]
    h48 = hadamard(48)
    np.testing.assert_allclose(after.constants[fc1.inputs[1]], before.constants["fc1.w"] @ h48, atol=1e-5)
    np.testing.assert_allclose(after.constants[fc1.inputs[2]], before.constants["fc1.b"] @ h48, atol=1e-5)
    np.testing.assert_allclose(after.constants[fc2.inputs[1]], h48.T @ before.constants["fc2.w"], atol=1e-5)
    assert after.metadata["hadamard"] == [{"node": "fc2", "mode": "offline", "size": 48, "producer": "fc1"}]
    assert_same_outputs(before, after, random_feeds(before))


def _attention(heads=2, d=16):
    """v -> heads reshape/transpose -> probs @ v -> back -> o (probs from x by Softmax)."""
    c = heads * d
    b = GraphBuilder({"x": (B, S, c), "p": (B, heads, S, S)})
    v = b.linear("v", "x", c, c, (B, S))
    r = b.node("Reshape", "split", [v], "v4", (B, S, heads, d), shape=(B, S, heads, d))
    t = b.node("Transpose", "vt", [r], "vt", (B, heads, S, d), perm=(0, 2, 1, 3))
    p = b.node("Softmax", "softmax", ["p"], "probs", (B, heads, S, S), axis=3)
    ctx = b.node("MatMul", "pv", [p, t], "ctx", (B, heads, S, d))
    back = b.node("Transpose", "ctxt", [ctx], "ctxt", (B, S, heads, d), perm=(0, 2, 1, 3))
    merged = b.node("Reshape", "merge", [back], "merged", (B, S, c), shape=(B, S, c))
    b.linear("o", merged, c, c, (B, S))
    return b.build(["o.out"])


def test_offline_head_blocks_through_attention():
    before = _attention()
    after = HadamardRotationPass(layers={"o"})(before).graph
    assert [n.op for n in after.nodes] == [n.op for n in before.nodes]
    assert after.metadata["hadamard"] == [{"node": "o", "mode": "offline", "size": 16, "producer": "v"}]
    assert_same_outputs(before, after, random_feeds(before))
    online = HadamardRotationPass(layers={"o"}, offline=False)(before).graph
    assert [n.op for n in online.nodes].count("Hadamard") == 1
    assert_same_outputs(before, online, random_feeds(before))


def test_nothing_changes_without_a_supported_size():
    b = GraphBuilder({"x": (B, S, 6)})
    b.linear("fc", "x", 6, 4, (B, S))
    before = b.build(["fc.out"])
    result = HadamardRotationPass()(before)
    assert not result.modified and result.graph is before
    assert not HadamardRotationPass(online=False)(_mlp()).modified


def test_whole_mlp_numeric_and_compiled():
    from qcompile.backends import llvm
    from qcompile.backends.runtime import HostModule

    before = _mlp(k=24, n=48)
    after = HadamardRotationPass()(before).graph
    feeds = random_feeds(before)
    assert_same_outputs(before, after, feeds)
    ex = llvm.build(after, llvm.host_target())
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        llvm.export_library(ex, f"{tmp}/m.so")
        got = HostModule(f"{tmp}/m.so", after.inputs, after.outputs)(feeds)
    np.testing.assert_allclose(got["fc2.out"], run(before, feeds)["fc2.out"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,last", [(12, 12), (32, 384), (384, 384), (1536, 1536)])
def test_hadamard_op_lowering_matches_interpreter(size, last, tmp_path):
    from qcompile.backends import llvm
    from qcompile.backends.runtime import HostModule

    b = GraphBuilder({"x": (3, last)})
    b.node("Hadamard", "h", ["x"], "y", (3, last), size=size, axis=-1)
    g = b.build(["y"])
    feeds = random_feeds(g)
    llvm.export_library(llvm.build(g, llvm.host_target()), tmp_path / "m.so")
    got = HostModule(str(tmp_path / "m.so"), ["x"], ["y"])(feeds)["y"]
    np.testing.assert_allclose(got, feeds["x"] @ np.kron(np.eye(last // size, dtype=np.float32), hadamard(size)),
                               atol=1e-5)
