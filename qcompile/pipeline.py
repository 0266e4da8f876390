"""Which passes run for a CompileConfig, in which order: the one place that lists the pipeline.

:func:`optimize` returns ``(float_graph, graph_to_build)``. The float graph (after folding
and the function-preserving ``config.passes``) is the reference the verify step and
``qcompile compare`` measure against; the second graph is what the backend lowers.

Order: [pre-quantized model: keep its recipe, or DequantizeImportedPass with --requantize]
-> FoldLinearPass -> reorder / hadamard (as listed) -> one quantizer: integer-only
(IntegerizePass), W8A8 (QuantizeActivationsPass), RTN / GPTQ weight-only, or mixed precision.
Calibration data: ``config.calib`` (npz), else the compile's inputs, else synthesized ones.
"""

from __future__ import annotations

import logging

import numpy as np

from .config import CompileConfig
from .errors import InputError
from .ir import Graph

__all__ = ["optimize", "synthesize_inputs", "check_feeds"]

logger = logging.getLogger("qcompile")


def synthesize_inputs(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for the compile-time accuracy check.

    Float inputs are standard normal; integer inputs that index a Gather/QGather table are
    uniform over the table's rows; other integer inputs (masks, type ids) are 1.
    """
    rng = np.random.default_rng(seed)
    bounds = _index_bounds(graph)
    feeds = {}
    for name in graph.inputs:
        t = graph.type_of(name)
        if np.issubdtype(np.dtype(t.dtype), np.floating):
            feeds[name] = rng.standard_normal(t.shape).astype(t.dtype)
        elif name in bounds:
            feeds[name] = rng.integers(0, bounds[name], size=t.shape).astype(t.dtype)
        else:
            feeds[name] = np.ones(t.shape, dtype=t.dtype)
    return feeds


def _index_bounds(graph: Graph) -> dict[str, int]:
    bounds = {}
    for node in graph.nodes:
        if node.op == "Gather" and node.attrs.get("axis", 0) == 0:
            bounds[node.inputs[1]] = graph.type_of(node.inputs[0]).shape[0]
        elif node.op == "QGather":
            bounds[node.inputs[-1]] = graph.values[node.inputs[0]].quant.logical_shape[0]
    return {k: v for k, v in bounds.items() if k in graph.inputs}


def check_feeds(graph: Graph, feeds: dict) -> dict:
    missing = [n for n in graph.inputs if n not in feeds]
    if missing:
        raise InputError(f"missing input(s): {', '.join(missing)} (model inputs: {', '.join(graph.inputs)})")
    return {n: np.asarray(feeds[n]) for n in graph.inputs}


def optimize(graph: Graph, config: CompileConfig, calibration: dict | None = None) -> tuple[Graph, Graph]:
    """Return (float graph after folding and ``config.passes``, graph to build)."""
    from qcompile.passes.fold_linear import FoldLinearPass

    from qcompile.passes.dequantize_imported import DequantizeImportedPass, has_imported_quantization

    if has_imported_quantization(graph):
        if not getattr(config, "requantize", False):
            logger.info("model is pre-quantized: keeping its recipe (use --requantize to re-quantize)")
            graph = FoldLinearPass()(graph).graph
            return graph, graph
        graph = DequantizeImportedPass()(graph).graph
    float_graph = FoldLinearPass()(graph).graph
    float_graph = _graph_passes(float_graph, config.passes, calibration)
    if not config.quantize:
        return float_graph, float_graph
    return float_graph, _quantize(float_graph, config, calibration)


def _quantize(graph: Graph, config: CompileConfig, calibration: dict | None) -> Graph:
    """Weight quantization by ``config``: RTN or GPTQ, uniform or mixed precision.

    GPTQ and mixed precision calibrate (passes.calibrate) on ``config.calib`` (npz), else
    ``calibration`` (the eval inputs; a leading axis that is a multiple of the model's batch
    is split into samples), else synthesized inputs. With ``act_bits`` 8, ``method`` gptq
    first rounds the Linear weights by GPTQ onto the int8 GEMMs' per-channel grid.
    """
    from qcompile.passes.quant_config import WeightQuantConfig
    from qcompile.passes.quantize_weights import QuantizeWeightsPass

    if config.act_bits != 16 and config.method == "gptq":  # GPTQ weights on the int8 GEMMs' grid
        from qcompile.passes import calibrate
        from qcompile.passes.gptq import GPTQRoundWeightsPass

        stats = calibrate.collect_statistics(graph, _calibration_feeds(graph, config, calibration))
        graph = GPTQRoundWeightsPass(stats, int(config.bits), act_order=config.act_order)(graph).graph
    if config.integer_only:
        from qcompile.passes.gptq import label_rounded
        from qcompile.passes.integerize import integerize_w8a8

        return label_rounded(integerize_w8a8(graph, config, calibration))
    if config.act_bits != 16:
        from qcompile.passes.gptq import label_rounded
        from qcompile.passes.quantize_activations import quantize_w8a8

        return label_rounded(quantize_w8a8(graph, config, calibration))
    wq = WeightQuantConfig(
        bits=4 if config.mixed_precision else int(config.bits), group_size=config.group_size,
        symmetric=config.symmetric, embedding_bits=config.embedding_bits,
    )
    from qcompile.passes import calibrate

    feeds = None
    layer_bits: dict[str, int] = {}
    if config.outlier_bits:
        from qcompile.passes.outlier_split import SplitOutlierGroupsPass, outlier_layer_bits

        feeds = _calibration_feeds(graph, config, calibration)
        graph = SplitOutlierGroupsPass(feeds, config.group_size)(graph).graph
        layer_bits = outlier_layer_bits(graph, config.outlier_bits)
    if config.method == "rtn" and not config.mixed_precision:
        return QuantizeWeightsPass(wq, layer_bits=layer_bits)(graph).graph
    feeds = feeds or _calibration_feeds(graph, config, calibration)
    if config.method == "gptaq" and not config.mixed_precision:  # collects its own statistics, in order
        from qcompile.passes.gptaq import ErrorFeedbackQuantizer

        quantizer = ErrorFeedbackQuantizer(graph, feeds, act_order=config.act_order)
        return QuantizeWeightsPass(wq, layer_bits=layer_bits, quantizer=quantizer)(graph).graph
    stats = calibrate.collect_statistics(graph, feeds)
    if config.mixed_precision:
        from qcompile.passes.mixed_precision import MixedPrecisionPass

        budget = None if config.size_budget_mb is None else int(config.size_budget_mb * 1e6)
        avg = None if budget is not None else float(config.bits)
        return MixedPrecisionPass(wq, stats, avg_bits=avg, size_budget_bytes=budget, method=config.method,
                                  act_order=config.act_order, fixed_bits=layer_bits, feeds=feeds)(graph).graph
    from qcompile.passes.gptq import GPTQPass

    return GPTQPass(wq, stats, act_order=config.act_order, layer_bits=layer_bits)(graph).graph


def _calibration_feeds(graph: Graph, config: CompileConfig, calibration: dict | None) -> list[dict]:
    from qcompile.passes import calibrate

    arrays = calibrate.load_npz(config.calib) if config.calib else calibration
    return calibrate.split_batches(graph, arrays) if arrays is not None else [synthesize_inputs(graph)]


def _graph_passes(graph: Graph, names, calibration: dict | None) -> Graph:
    """Run the function-preserving passes named in ``names`` (CompileConfig.passes), in order.

    "reorder" calibrates on ``calibration`` (the compile's calibration or eval inputs, split into
    samples of the model's batch) or, without them, on
    :func:`synthesize_inputs`. The result is the float reference of the verify step.
    """
    for name in names:
        if name == "reorder":
            from qcompile.passes.calibrate import split_batches
            from qcompile.passes.reorder_channels import ReorderChannelsPass

            feeds = split_batches(graph, calibration) if calibration is not None else synthesize_inputs(graph)
            graph = ReorderChannelsPass(feeds)(graph).graph
        elif name == "hadamard":
            from qcompile.passes.hadamard_rotation import HadamardRotationPass

            graph = HadamardRotationPass()(graph).graph
    return graph
