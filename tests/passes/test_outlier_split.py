"""SplitOutlierGroupsPass (--outlier-bits): group-aligned split, function kept, refusals, widths."""

from __future__ import annotations

import numpy as np
import pytest
from rotation_graphs import GraphBuilder, assert_same_outputs, random_feeds, structure

from qcompile.errors import InputError
from qcompile.passes.outlier_split import SplitOutlierGroupsPass, outlier_layer_bits, outlier_rows
from qcompile.passes.quant_config import WeightQuantConfig
from qcompile.passes.quantize_weights import QuantizeWeightsPass

B, S, K, N = 2, 4, 64, 16


def _linear():
    b = GraphBuilder({"x": (B, S, K)})
    b.linear("fc", "x", K, N, (B, S))
    return b.build(["fc.out"])


def test_outlier_rows_leading_groups_only():
    mag = np.ones(64)
    mag[3] = mag[17] = 10.0  # groups 0 and 1 (of 16) hold outliers
    mag[40] = 10.0  # an outlier after a plain group does not count
    assert outlier_rows(mag, 16, ratio=4.0, max_fraction=0.5) == 32
    assert outlier_rows(mag, 16, ratio=4.0, max_fraction=0.25) == 16  # capped at whole groups
    assert outlier_rows(np.ones(64), 16, ratio=4.0, max_fraction=0.5) == 0


def test_split_is_group_aligned_and_keeps_the_function():
    before = _linear()
    feeds = random_feeds(before, outlier_channels=(2, 20))
    result = SplitOutlierGroupsPass(feeds, 16, max_fraction=0.5)(before)
    assert result.modified
    after = result.graph
    assert [(n.op, n.name) for n in after.nodes] == [
        ("Slice", "fc.slice_outliers"), ("Slice", "fc.slice_rest"), ("Linear", "fc.outliers"),
        ("Linear", "fc"), ("Add", "fc.add_outliers")]
    assert after.metadata["outlier_split"] == {"fc": {"outlier_node": "fc.outliers", "outlier_rows": 32, "rows": 64}}
    np.testing.assert_array_equal(after.constants[after.nodes[2].inputs[1]], before.constants["fc.w"][:32])
    np.testing.assert_array_equal(after.constants[after.nodes[3].inputs[1]], before.constants["fc.w"][32:])
    assert len(after.nodes[2].inputs) == 2 and after.nodes[3].inputs[2] == "fc.b"  # bias added once
    assert_same_outputs(before, after, random_feeds(before, seed=5))


def test_outlier_pieces_get_their_own_width():
    before = _linear()
    after = SplitOutlierGroupsPass(random_feeds(before, outlier_channels=(1,)), 16)(before).graph
    bits = outlier_layer_bits(after, 8)
    assert bits == {"fc.outliers": 8}
    q = QuantizeWeightsPass(WeightQuantConfig(bits=2, group_size=16), layer_bits=bits)(after).graph
    assert {e["node"]: e["bits"] for e in q.metadata["quant_recipe"]} == {"fc.outliers": 8, "fc": 2}


def test_no_outliers_changes_nothing():
    before = _linear()
    result = SplitOutlierGroupsPass(random_feeds(before), 16)(before)
    assert not result.modified and structure(result.graph) == structure(before)


def test_needs_groups_and_feeds():
    with pytest.raises(InputError, match="group-size"):
        SplitOutlierGroupsPass({"x": None}, 0)
    with pytest.raises(InputError, match="calibration"):
        SplitOutlierGroupsPass([], 16)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_pipeline_outlier_bits(method):
    from qcompile.config import CompileConfig
    from qcompile.pipeline import optimize

    before = _linear()
    feeds = random_feeds(before, outlier_channels=(0, 5))
    config = CompileConfig(bits=2, group_size=16, outlier_bits=4, method=method, embedding_bits=None)
    _, q = optimize(before, config, calibration=feeds)
    assert {e["node"]: (e["bits"], e["method"]) for e in q.metadata["quant_recipe"]} == {
        "fc.outliers": (4, method), "fc": (2, method)}
    with pytest.raises(InputError, match="outlier-bits"):
        CompileConfig(bits=4, group_size=0, outlier_bits=8)
