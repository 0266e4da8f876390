"""IR -> ONNX export, so any IR stage opens in Netron and float stages run in onnxruntime.

``to_onnx(graph, expand_quantized=True, opset=17)``. Rewrites (the inverse of the frontend):

1. Linear -> MatMul (+ Add bias); LayerNorm -> LayerNormalization; Gelu -> Gelu at
   opset >= 20, otherwise its erf / tanh formula.
2. Static attributes that ONNX takes as tensors (Reshape/Expand shape, Slice bounds, Clip
   bounds, ReduceSum axes at opset 13+, all Reduce axes at 18+) become int64/float
   initializers named after the node.
3. QLinear / QGather: with ``expand_quantized`` the packed weight is dequantized to a float
   initializer feeding MatMul(+Add) / Gather, so the model runs anywhere; otherwise they
   stay single nodes in the custom domain ``qcompile`` over the packed initializers.

Every value gets a value_info with its static type. Constants no exported node uses are
left out.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UnsupportedOpError
from .interpreter import dequantize_qgather_table, dequantize_qlinear_weight
from .ir import Graph, Node
from .ops import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, REDUCTIONS

__all__ = ["to_onnx", "CUSTOM_DOMAIN"]

CUSTOM_DOMAIN = "qcompile"
_INT64_MIN = np.iinfo(np.int64).min


def to_onnx(graph: Graph, expand_quantized: bool = True, opset: int = 17) -> onnx.ModelProto:
    """Translate ``graph`` to an ONNX ModelProto (opset >= 17 for LayerNormalization)."""
    if opset < 17:
        raise ValueError("to_onnx needs opset >= 17 (LayerNormalization)")
    b = _Builder(graph, opset, expand_quantized)
    for node in graph.nodes:
        b.node = node
        _export_node(b, node)
    return b.model()


class _Builder:
    def __init__(self, graph: Graph, opset: int, expand_quantized: bool):
        self.graph, self.opset, self.expand = graph, opset, expand_quantized
        self.nodes: list[onnx.NodeProto] = []
        self.extra_inits: dict[str, np.ndarray] = {}
        self.used_names = set(graph.values)
        self.node: Node | None = None
        self.custom = False
        self.node_names: set[str] = set()

    def fresh(self, suffix: str) -> str:
        base = f"{self.node.name}/{suffix}"
        name, i = base, 1
        while name in self.used_names:
            name, i = f"{base}_{i}", i + 1
        self.used_names.add(name)
        return name

    def const(self, suffix: str, array) -> str:
        name = self.fresh(suffix)
        self.extra_inits[name] = np.asarray(array)
        return name

    def add(self, op_type: str, inputs: list[str], outputs: list[str] | None = None, domain: str = "", **attrs) -> str:
        outputs = outputs or [self.fresh(op_type)]
        name = self.node.name if self.node.name not in self.node_names else self.fresh(op_type)
        self.node_names.add(name)
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0]

    def model(self) -> onnx.ModelProto:
        g = self.graph
        used = {i for n in self.nodes for i in n.input} | set(g.outputs)
        inits = [numpy_helper.from_array(a, n) for n, a in g.constants.items() if n in used]
        inits += [numpy_helper.from_array(a, n) for n, a in self.extra_inits.items()]
        boundary = set(g.inputs) | set(g.outputs) | set(g.constants)
        value_info = [_info(g, n) for n in g.values if n not in boundary and n in used]
        proto_graph = helper.make_graph(
            self.nodes, g.name, [_info(g, n) for n in g.inputs], [_info(g, n) for n in g.outputs], inits,
            value_info=value_info,
        )
        opsets = [helper.make_opsetid("", self.opset)] + ([helper.make_opsetid(CUSTOM_DOMAIN, 1)] if self.custom else [])
        model = helper.make_model(proto_graph, opset_imports=opsets, producer_name="qcompile")
        model.ir_version = min(model.ir_version, 10)
        for key, value in g.metadata.items():
            model.metadata_props.add(key=str(key), value=str(value))
        return model


def _info(graph: Graph, name: str) -> onnx.ValueInfoProto:
    t = graph.type_of(name)
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), list(t.shape))


def _export_node(b: _Builder, node: Node) -> None:
    op = node.op
    if op in ELEMENTWISE_BINARY or op in ELEMENTWISE_UNARY or op in ("Where", "MatMul", "GlobalAveragePool"):
        b.add(op, node.inputs, node.outputs)
    elif op in REDUCTIONS:
        _reduce(b, node)
    elif op in _EXPORTERS:
        _EXPORTERS[op](b, node)
    else:
        raise UnsupportedOpError(op, node.name, "no ONNX export")


def _dtype_of(b, name):
    return np.dtype(b.graph.type_of(name).dtype)


def _reduce(b, node):
    axes, keep = list(node.attrs["axes"]), int(bool(node.attrs["keepdims"]))
    if b.opset >= 18 or node.op == "ReduceSum":
        b.add(node.op, [node.inputs[0], b.const("axes", np.asarray(axes, np.int64))], node.outputs, keepdims=keep)
    else:
        b.add(node.op, node.inputs, node.outputs, axes=axes, keepdims=keep)


def _clip(b, node):
    dt = _dtype_of(b, node.inputs[0])
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    ins = [node.inputs[0], "" if lo is None else b.const("min", np.asarray(lo, dt)), "" if hi is None else b.const("max", np.asarray(hi, dt))]
    b.add("Clip", ins, node.outputs)


def _gelu(b, node):
    x, approx = node.inputs[0], node.attrs.get("approximate", "none")
    if b.opset >= 20:
        b.add("Gelu", [x], node.outputs, approximate=approx)
        return
    dt = _dtype_of(b, x)
    c = lambda tag, v: b.const(tag, np.asarray(v, dt))  # noqa: E731
    if approx == "tanh":
        cube = b.add("Mul", [b.add("Mul", [x, x]), x])
        inner = b.add("Add", [x, b.add("Mul", [cube, c("k", 0.044715)])])
        core = b.add("Tanh", [b.add("Mul", [inner, c("sqrt_2_over_pi", np.sqrt(2 / np.pi))])])
    else:
        core = b.add("Erf", [b.add("Mul", [x, c("inv_sqrt2", 1 / np.sqrt(2))])])
    half_x = b.add("Mul", [x, c("half", 0.5)])
    b.add("Mul", [half_x, b.add("Add", [core, c("one", 1.0)])], node.outputs)


def _cast(b, node):
    b.add("Cast", node.inputs, node.outputs, to=helper.np_dtype_to_tensor_dtype(np.dtype(node.attrs["to"])))


def _layer_norm(b, node):
    b.add("LayerNormalization", node.inputs, node.outputs, axis=node.attrs["axis"], epsilon=node.attrs.get("epsilon", 1e-5))


def _matmul_bias(b, node, x, weight_name, bias):
    if bias:
        b.add("Add", [b.add("MatMul", [x, weight_name]), bias], node.outputs)
    else:
        b.add("MatMul", [x, weight_name], node.outputs)


def _linear(b, node):
    _matmul_bias(b, node, node.inputs[0], node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else "")


def _args(b, node):
    return [b.graph.constants.get(n) if n else None for n in node.inputs]


def _qlinear(b, node):
    if not b.expand:
        return _custom(b, node)
    weight = b.const("weight", dequantize_qlinear_weight(b.graph, node, _args(b, node)))
    _matmul_bias(b, node, node.inputs[0], weight, node.inputs[4] if len(node.inputs) > 4 else "")


def _qgather(b, node):
    if not b.expand:
        return _custom(b, node)
    table = b.const("table", dequantize_qgather_table(b.graph, node, _args(b, node)))
    b.add("Gather", [table, node.inputs[-1]], node.outputs, axis=0)


def _custom(b, node):
    b.custom = True
    quant = b.graph.values[node.inputs[0 if node.op == "QGather" else 1]].quant
    attrs = {k: (int(v) if isinstance(v, bool) else v) for k, v in node.attrs.items()}
    b.add(node.op, node.inputs, node.outputs, domain=CUSTOM_DOMAIN, logical_shape=list(quant.logical_shape), **attrs)


def _shape_input(op):
    def export(b, node):
        b.add(op, [node.inputs[0], b.const("shape", np.asarray(node.attrs["shape"], np.int64))], node.outputs)

    return export


def _slice(b, node):
    a = node.attrs
    ends = [e if e >= 0 else _INT64_MIN for e in a["ends"]]
    ins = [node.inputs[0]] + [b.const(k, np.asarray(v, np.int64)) for k, v in
                              (("starts", a["starts"]), ("ends", ends), ("axes", a["axes"]), ("steps", a["steps"]))]
    b.add("Slice", ins, node.outputs)


def _with_attrs(op, *keys):
    def export(b, node):
        attrs = {k: (list(node.attrs[k]) if isinstance(node.attrs[k], tuple) else node.attrs[k]) for k in keys if k in node.attrs}
        if op == "Conv":
            attrs["kernel_shape"] = list(b.graph.type_of(node.inputs[1]).shape[2:])
        b.add(op, node.inputs, node.outputs, **attrs)

    return export


_EXPORTERS = {
    "Clip": _clip, "Gelu": _gelu, "Cast": _cast, "LayerNorm": _layer_norm,
    "Softmax": _with_attrs("Softmax", "axis"), "Linear": _linear, "QLinear": _qlinear, "QGather": _qgather,
    "Reshape": _shape_input("Reshape"), "Expand": _shape_input("Expand"), "Slice": _slice,
    "Transpose": _with_attrs("Transpose", "perm"), "Gather": _with_attrs("Gather", "axis"),
    "Concat": _with_attrs("Concat", "axis"),
    "Conv": _with_attrs("Conv", "strides", "pads", "dilations", "group"),
    "MaxPool": _with_attrs("MaxPool", "kernel_shape", "strides", "pads"),
    "AveragePool": _with_attrs("AveragePool", "kernel_shape", "strides", "pads"),
}
