"""QDQ node groups -> onnxruntime's QOperator ops, as onnxruntime's default session fuses them.

A QDQ model spells every quantized operation as ``DequantizeLinear -> op -> QuantizeLinear``.
Read by the ONNX specification (onnxruntime's ``ORT_ENABLE_BASIC``), the op runs in float32
on dequantized values; onnxruntime's default session (``ORT_ENABLE_EXTENDED`` and ``ALL``,
what users run) instead replaces each such group by an integer QOperator kernel
(``QDQSelectorActionTransformer``). The two readings differ: a float GEMM's summation order
decides on which side of a quantization step a value lands, and one flipped activation code
moves MiniLM's embedding by 1e-3..7e-3. The integer kernels are exact (int32 accumulation,
then MLAS's float32 rescale, reproduced bit for bit by :mod:`.onnx_qoperator`), so importing
the fused form makes qcompile equal onnxruntime's default session instead of depending on
float rounding.

:func:`fuse_qdq_groups` rewrites (on a copy of the model) every group where

* the op is ``MatMul`` (-> ``QLinearMatMul``), ``Add`` / ``Mul`` (-> ``com.microsoft.QLinearAdd`` /
  ``QLinearMul``) or ``Softmax`` (-> ``com.microsoft.QLinearSoftmax``, uint8 only);
* each data input is the output of a ``DequantizeLinear`` with constant, per-tensor scale and
  zero point (a MatMul's 2-D right operand may be per column, ``axis`` 1), 8-bit codes;
* the op's only consumer is one ``QuantizeLinear`` (constant per-tensor scale and zero point)
  and its output is not a graph output; activation codes and the output share one type
  (Add/Mul/Softmax), as onnxruntime's selectors require.

Dequantized values still used elsewhere keep their ``DequantizeLinear`` (onnxruntime
duplicates shared ones). Everything else is left as it is: a ``DequantizeLinear -> Reshape
-> QuantizeLinear`` with equal parameters is exact in float as well.
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx
from onnx import helper, numpy_helper

__all__ = ["fuse_qdq_groups", "has_qdq_groups", "qdq_groups"]

logger = logging.getLogger(__name__)

_FUSED = {"MatMul": ("QLinearMatMul", ""), "Add": ("QLinearAdd", "com.microsoft"),
          "Mul": ("QLinearMul", "com.microsoft"), "Softmax": ("QLinearSoftmax", "com.microsoft")}
_CODE_TYPES = ("uint8", "int8")


class _Graph:
    """Producers, consumers and constants of an ONNX graph (by tensor name)."""

    def __init__(self, graph: onnx.GraphProto):
        self.consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.uses = Counter(i for n in graph.node for i in n.input if i)
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def qparams(self, node, per_column_ok: bool = False):
        """(scale, zero point) of a Q/DQ node when both are constants, per tensor (or per last
        axis when ``per_column_ok``) and the codes are 8-bit; otherwise None."""
        if len(node.input) < 3 or node.input[1] not in self.consts or node.input[2] not in self.consts:
            return None
        scale, zp = self.consts[node.input[1]], self.consts[node.input[2]]
        if str(zp.dtype) not in _CODE_TYPES:
            return None
        if scale.size != 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if not per_column_ok or axis != 1 or any(a.name == "block_size" and a.i for a in node.attribute):
                return None
        return scale, zp


def _dq_inputs(g: _Graph, node) -> list | None:
    """The DequantizeLinear producing each data input of ``node`` (None when one is not)."""
    count = 1 if node.op_type == "Softmax" else 2
    dqs = [g.producer.get(name) for name in node.input[:count]]
    if len(node.input) != count or any(d is None or d.op_type != "DequantizeLinear" for d in dqs):
        return None
    for i, dq in enumerate(dqs):
        params = g.qparams(dq, per_column_ok=node.op_type == "MatMul" and i == 1)
        if params is None or (dq.input[0] not in g.consts and params[0].size != 1):
            return None
    return dqs


def _q_output(g: _Graph, node):
    """The single QuantizeLinear consuming ``node``'s output (None when there is no such)."""
    out = node.output[0]
    users = g.consumers.get(out, [])
    if out in g.outputs or len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return None
    q = users[0]
    return q if g.qparams(q) is not None else None


def _types_agree(g: _Graph, node, dqs, q) -> bool:
    """onnxruntime's type rules: Add/Mul/Softmax codes and output share one type (uint8 for Softmax)."""
    out = str(g.consts[q.input[2]].dtype)
    ins = [str(g.consts[d.input[2]].dtype) for d in dqs]
    if node.op_type == "MatMul":
        return ins[0] == out
    if node.op_type == "Softmax":
        return ins == ["uint8"] and out == "uint8"
    return all(t == out for t in ins)


def _fused_node(node, dqs, q, opset: int):
    op, domain = _FUSED[node.op_type]
    inputs = [name for dq in dqs for name in dq.input[:3]] + list(q.input[1:3])
    attrs = {}
    if node.op_type == "Softmax":
        attrs = {"axis": next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1), "opset": opset}
    return helper.make_node(op, inputs, [q.output[0]], name=node.name or q.name, domain=domain, **attrs)


def _groups(g: _Graph, graph: onnx.GraphProto):
    """(op node, its DequantizeLinear inputs, its QuantizeLinear) of every fusible group."""
    for node in graph.node:
        if node.op_type not in _FUSED:
            continue
        dqs = _dq_inputs(g, node)
        q = _q_output(g, node) if dqs is not None else None
        if q is not None and _types_agree(g, node, dqs, q):
            yield node, dqs, q


def qdq_groups(model: onnx.ModelProto) -> list[tuple]:
    """(op node, its DequantizeLinear inputs, its QuantizeLinear) of every group
    :func:`fuse_qdq_groups` rewrites, in node order."""
    return list(_groups(_Graph(model.graph), model.graph))


def has_qdq_groups(model: onnx.ModelProto) -> bool:
    """True when :func:`fuse_qdq_groups` would rewrite something."""
    return next(_groups(_Graph(model.graph), model.graph), None) is not None


def fuse_qdq_groups(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every fusible QDQ group replaced by its QOperator node."""
    opset = next((int(e.version) for e in model.opset_import if e.domain in ("", "ai.onnx")), 1)
    g = _Graph(model.graph)
    groups = list(_groups(g, model.graph))
    if not groups:
        return model
    fused = {id(node): _fused_node(node, dqs, q, opset) for node, dqs, q in groups}
    drop = {id(q) for _, _, q in groups}
    uses = Counter(g.uses)
    for node, dqs, _ in groups:
        for dq in dqs:
            uses[dq.output[0]] -= 1
    drop |= {id(dq) for _, dqs, _ in groups for dq in dqs if uses[dq.output[0]] == 0 and dq.output[0] not in g.outputs}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [fused.get(id(n), n) for n in model.graph.node if id(n) not in drop]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(e.domain == "com.microsoft" for e in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    logger.info("fused %d QDQ group(s): %s", len(groups), dict(Counter(_FUSED[n.op_type][0] for n, _, _ in groups)))
    return out
