"""ONNX frontend: ``load_onnx(model, shapes) -> Graph`` with static shapes everywhere.

Import walks the ONNX nodes in order and hands each to its converter (:mod:`.onnx_ops`),
which emits IR nodes through :class:`Importer`. Invariants of the result:

1. Every value has a static :class:`TensorType` computed by qcompile's own shape rules
   (:mod:`.shape_inference`); symbolic input dims must be bound through ``shapes``.
2. Constant folding is complete: an emitted node whose inputs are all constants is
   evaluated at once (with the reference interpreter's kernels) and becomes a constant,
   so shape subgraphs (Shape/Gather/Concat/ConstantOfShape/Range/...) vanish and
   shape-like operands become the static attributes :mod:`qcompile.ops` demands.
3. The IR holds only ops of :mod:`qcompile.ops`; Identity/Dropout are dropped (aliased).
4. Value names are ONNX's (graph inputs and outputs verbatim, others sanitised); node
   names are ONNX's or generated, unique either way. Unused values are removed.

Errors: unreadable model -> ModelFormatError naming the file; unbound symbolic dim ->
ShapeError naming input, dim index and dim name; unsupported op -> UnsupportedOpError.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelFormatError, ShapeError
from ..interpreter import run_node
from ..ir import Graph, Node, TensorType, verify
from .onnx_qdq_fusion import fuse_qdq_groups
from .shape_inference import infer_types

__all__ = ["load_onnx", "Importer"]

_NAME_RE = re.compile(r"[^0-9A-Za-z_./:\-]")


def load_onnx(model: str | os.PathLike | onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
              fuse_qdq: bool = True) -> Graph:
    """Import an ONNX model (path or ModelProto) as a static-shape IR graph.

    ``fuse_qdq``: QDQ node groups become onnxruntime's integer QOperator kernels, as its default
    session runs them (:mod:`.onnx_qdq_fusion`); False keeps the ONNX specification's float reading."""
    proto, source = _read(model)
    if fuse_qdq:
        proto = fuse_qdq_groups(proto)
    importer = Importer(proto, source)
    importer.bind_inputs(shapes or {})
    importer.convert_nodes()
    graph = importer.finish()
    verify(graph)
    return graph


def _read(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, "<ModelProto>"
    path = Path(model)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # protobuf raises DecodeError, RuntimeWarning-ish, OSError ...
        raise ModelFormatError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelFormatError(f"{path}: not a readable ONNX model (no graph)")
    return proto, str(path)


class Importer:
    """Conversion state: ONNX name -> IR name, pending constants, the graph under construction.

    Constants (initializers, Constant nodes, folded results) stay pending in ``consts`` and
    enter ``graph.constants`` only when a non-folded IR node or a graph output uses them.
    """

    def __init__(self, proto: onnx.ModelProto, source: str):
        self.proto = proto
        self.opset = _default_opset(proto)
        name = proto.graph.name or Path(source).stem or "model"
        meta = {"source": source, "opset": self.opset, "producer": f"{proto.producer_name} {proto.producer_version}".strip()}
        self.graph = Graph(name, [], [], [], {}, {}, meta)
        self.names: dict[str, str] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.used: set[str] = set()
        self.node_names: set[str] = set()
        self.current = ""
        self.consumed = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
        for init in proto.graph.initializer:
            self.set_const(init.name, numpy_helper.to_array(init))
        for init in proto.graph.sparse_initializer:
            self.set_const(init.values.name, _sparse_to_dense(init))

    # -- names ---------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        base = _NAME_RE.sub("_", base) or "v"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def ir(self, onnx_name: str) -> str:
        if onnx_name == "":
            return ""
        try:
            return self.names[onnx_name]
        except KeyError:
            raise ModelFormatError(f"node '{self.current}' uses '{onnx_name}', which nothing produces") from None

    def alias(self, onnx_name: str, ir_name: str) -> None:
        self.names[onnx_name] = ir_name

    # -- constants and types -----------------------------------------------------------
    def set_const(self, onnx_name: str, array: np.ndarray) -> str:
        name = self.new_const(onnx_name, array)
        self.names[onnx_name] = name
        return name

    def new_const(self, base: str, array) -> str:
        """A new pending constant (IR name derived from ``base``)."""
        name = self.fresh(base)
        self.consts[name] = np.asarray(array)
        return name

    def const(self, ir_name: str) -> np.ndarray | None:
        if ir_name in self.consts:
            return self.consts[ir_name]
        return self.graph.constants.get(ir_name)

    def type_of(self, ir_name: str) -> TensorType:
        array = self.const(ir_name)
        if array is not None:
            return TensorType(tuple(int(d) for d in array.shape), str(array.dtype))
        return self.graph.type_of(ir_name)

    def _materialize(self, ir_name: str) -> None:
        if ir_name in self.consts:
            self.graph.add_constant(ir_name, self.consts.pop(ir_name))

    # -- emission ------------------------------------------------------------------
    def emit(self, op: str, inputs: list[str], attrs: dict | None = None, outputs: list[str] | None = None,
             n_outputs: int = 1) -> list[str]:
        """Add IR node ``op`` (or fold it when all inputs are constants); bind ONNX ``outputs``.

        Returns the IR names of the results.
        """
        outputs = outputs or [""] * n_outputs
        attrs = attrs or {}
        base = self.current or op
        node = Node(op, self._node_name(base), list(inputs), [self.fresh(o or f"{base}_{op}_out") for o in outputs], attrs)
        if all(self.const(i) is not None for i in inputs if i):
            results = run_node(self.graph, node, [self.const(i) if i else None for i in inputs])
            for ir_name, array in zip(node.outputs, results):
                self.consts[ir_name] = np.asarray(array)
            self.node_names.discard(node.name)
        else:
            for i in inputs:
                self._materialize(i)
            for i in inputs:
                if i and i not in self.graph.values:
                    raise ModelFormatError(f"node '{self.current}': input '{i}' is not defined")
            for ir_name, ttype in zip(node.outputs, infer_types(self.graph, node)):
                self.graph.add_value(ir_name, ttype)
            self.graph.nodes.append(node)
        for onnx_name, ir_name in zip(outputs, node.outputs):
            if onnx_name:
                self.names[onnx_name] = ir_name
        return node.outputs

    def _node_name(self, base: str) -> str:
        name, i = base or "node", 1
        while name in self.node_names:
            name, i = f"{base}_{i}", i + 1
        self.node_names.add(name)
        return name

    # -- the three phases -----------------------------------------------------------------
    def bind_inputs(self, shapes: dict[str, tuple[int, ...]]) -> None:
        real_inputs = [v for v in self.proto.graph.input if v.name not in self.names]
        unknown = set(shapes) - {v.name for v in real_inputs}
        if unknown:
            raise ShapeError(f"--shape names unknown input(s) {sorted(unknown)}; model inputs: {[v.name for v in real_inputs]}")
        for info in real_inputs:
            ttype = _input_type(info, shapes.get(info.name))
            self.used.add(info.name)
            self.names[info.name] = info.name
            self.graph.add_value(info.name, ttype)
            self.graph.inputs.append(info.name)

    def convert_nodes(self) -> None:
        from .onnx_ops import convert_node

        for index, node in enumerate(self.proto.graph.node):
            self.current = node.name or f"{node.op_type}_{index}"
            convert_node(self, node)
        self.current = ""

    def finish(self) -> Graph:
        for info in self.proto.graph.output:
            ir_name = self.ir(info.name)
            self._materialize(ir_name)
            self.graph.outputs.append(self._output_name(info.name, ir_name))
        self.graph.remove_unused()
        return self.graph

    def _output_name(self, wanted: str, ir_name: str) -> str:
        """Make the IR output carry the ONNX output name (rename, or Identity when shared)."""
        g = self.graph
        if ir_name == wanted or wanted in g.values:
            return ir_name
        if ir_name in g.constants:
            self.used.add(wanted)
            return g.add_constant(wanted, g.constants[ir_name])
        producer = next((n for n in g.nodes if ir_name in n.outputs), None)
        if producer is None or ir_name in g.outputs:  # a graph input, or already an output
            self.current = wanted
            return self.emit("Identity", [ir_name], outputs=[wanted])[0]
        self.used.add(wanted)
        value = g.values.pop(ir_name)
        value.name = wanted
        g.values[wanted] = value
        producer.outputs[producer.outputs.index(ir_name)] = wanted
        for node in g.nodes:
            node.inputs = [wanted if i == ir_name else i for i in node.inputs]
        return wanted


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _sparse_to_dense(sparse) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    idx = numpy_helper.to_array(sparse.indices)
    if idx.ndim == 1:
        dense.reshape(-1)[idx] = values
    else:
        dense[tuple(idx.T)] = values
    return dense


def _input_type(info: onnx.ValueInfoProto, bound: tuple[int, ...] | None) -> TensorType:
    tt = info.type.tensor_type
    if not info.type.HasField("tensor_type"):
        raise ModelFormatError(f"input '{info.name}' is not a tensor")
    dtype = str(np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    dims = list(tt.shape.dim) if tt.HasField("shape") else None
    if bound is not None:
        bound = tuple(int(d) for d in bound)
        if dims is not None and len(dims) != len(bound):
            raise ShapeError(f"input '{info.name}' has rank {len(dims)}, but the bound shape {bound} has rank {len(bound)}")
        for i, d in enumerate(dims or []):
            if d.HasField("dim_value") and d.dim_value != bound[i]:
                raise ShapeError(f"input '{info.name}' dimension {i} is fixed to {d.dim_value}, bound to {bound[i]}")
        return TensorType(bound, dtype)
    if dims is None:
        raise ShapeError(f"input '{info.name}' has no shape; bind it with --shape {info.name}=...")
    shape = []
    for i, d in enumerate(dims):
        if not d.HasField("dim_value"):
            label = f" ('{d.dim_param}')" if d.dim_param else ""
            example = "x".join(str(x.dim_value) if x.HasField("dim_value") else "N" for x in dims)
            raise ShapeError(f"input '{info.name}' dimension {i}{label} is symbolic; bind it with --shape {info.name}={example}")
        shape.append(int(d.dim_value))
    return TensorType(tuple(shape), dtype)
