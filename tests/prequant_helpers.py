"""Per-node exactness of a pre-quantized ONNX model's run-time quantization nodes.

Shared by tests/frontends/test_prequantized.py (values from onnxruntime) and
tests/backends/test_arm64.py (values from a compiled host or arm64 artifact). A node is
checked when its first input is computed at run time (not an initializer): applying
qcompile's reference op to the node's observed inputs must give its observed outputs bit
for bit. The MiniLM models themselves come from the session fixture ``quantized_minilm``
in tests/conftest.py.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from qcompile.frontends.onnx_qdq_fusion import qdq_groups
from qcompile.frontends.onnx_quant import QRANGE
from qcompile.interpreter_quant import dynamic_quantize_linear, matmul_integer, quantize_linear

__all__ = ["QUANT_OPS", "quant_nodes", "expose_quant_tensors", "check_quant_nodes"]

QUANT_OPS = ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger")


def _consts(model) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def quant_nodes(model) -> list:
    """The model's QUANT_OPS nodes whose first input is a run-time value."""
    consts = _consts(model)
    return [n for n in model.graph.node if n.op_type in QUANT_OPS and n.input[0] not in consts]


def expose_quant_tensors(model) -> list[str]:
    """Add every run-time input and output of :func:`quant_nodes` to the graph outputs (in
    place); return the names of all graph outputs, in order. The float input of a
    QuantizeLinear that ends a QDQ group is left out: exposing it would keep the importer from
    fusing the group (``onnx_qdq_fusion``), and the fused kernel never computes it."""
    consts = _consts(model)
    fused = {op.output[0] for op, _, _ in qdq_groups(model)}
    wanted = {name for n in quant_nodes(model) for name in list(n.input) + list(n.output)
              if name and name not in consts and name not in fused}
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(v) for v in sorted(wanted - known))
    return [o.name for o in model.graph.output]


def check_quant_nodes(model, values: dict) -> int:
    """Assert each of :func:`quant_nodes` whose input was observed, fed its observed inputs from
    ``values`` (name -> array; initializers are taken from the model), reproduces its observed
    outputs exactly. Returns the number of nodes checked."""
    env = {**_consts(model), **values}
    nodes = [n for n in quant_nodes(model) if n.input[0] in env]
    for n in nodes:
        args = [env[i] if i else None for i in n.input]
        if n.op_type == "QuantizeLinear":
            qmin, qmax, dtype = QRANGE[str(args[2].dtype)]
            got = [quantize_linear(args[0], args[1], args[2], qmin, qmax, dtype)]
        elif n.op_type == "DynamicQuantizeLinear":
            got = list(dynamic_quantize_linear(args[0]))
        else:
            got = [matmul_integer(*args)]
        for out, value in zip(n.output, got):
            np.testing.assert_array_equal(value, env[out], err_msg=f"{n.op_type} {n.name}")
    return len(nodes)
