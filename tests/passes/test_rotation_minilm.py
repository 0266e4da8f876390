"""Reorder and Hadamard passes on the real MiniLM: function preserved, no runtime permutation. Slow."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from qcompile.interpreter import run
from qcompile.models import minilm
from qcompile.passes import FoldLinearPass
from qcompile.passes.hadamard_rotation import HadamardRotationPass
from qcompile.passes.reorder_channels import ReorderChannelsPass

pytestmark = pytest.mark.slow

BATCH, SEQ = 2, 16


@pytest.fixture(scope="module")
def setup(minilm_onnx):
    from qcompile.frontends.onnx_frontend import load_onnx

    graph = load_onnx(minilm_onnx, shapes={n: (BATCH, SEQ) for n in minilm.INPUT_NAMES})
    graph = FoldLinearPass()(graph).graph
    feeds = minilm.tokenize(minilm.SENTENCES[:BATCH], SEQ)
    calib = minilm.tokenize(minilm.SENTENCES[BATCH:2 * BATCH], SEQ)
    return graph, feeds, calib, run(graph, feeds)["embedding"]


def _variants(graph, calib):
    reordered = ReorderChannelsPass(calib)(graph).graph
    return {
        "reorder": reordered,
        "hadamard": HadamardRotationPass()(graph).graph,
        "both": HadamardRotationPass()(reordered).graph,
    }


def test_passes_preserve_outputs_and_add_no_permutation(setup):
    graph, feeds, calib, ref = setup
    ops_before = Counter(n.op for n in graph.nodes)
    for name, g in _variants(graph, calib).items():
        out = run(g, feeds)["embedding"]
        assert np.max(np.abs(out - ref)) <= 1e-4, name
        added = Counter(n.op for n in g.nodes) - ops_before
        assert set(added) <= {"Hadamard"}, (name, added)  # never a Gather/Transpose for the permutation
        assert all(ops_before[op] == Counter(n.op for n in g.nodes)[op] for op in ops_before), name
    reorder_meta = _variants(graph, calib)["reorder"].metadata["reorder"]
    assert len(reorder_meta["spaces"]) == 12  # per layer: V->O (within heads) and the FFN hidden
    assert any("graph output" in r["reason"] for r in reorder_meta["refused"])  # the residual stream


def test_rotated_minilm_compiles_and_matches(setup, tmp_path):
    from qcompile.backends import llvm
    from qcompile.backends.runtime import HostModule

    graph, feeds, calib, ref = setup
    g = _variants(graph, calib)["both"]
    llvm.export_library(llvm.build(g, llvm.host_target()), tmp_path / "m.so")
    got = HostModule(str(tmp_path / "m.so"), g.inputs, g.outputs)(feeds)["embedding"]
    assert np.max(np.abs(got - ref)) <= 1e-4
