"""IntegerizePass: a statically quantized W8A8 graph becomes integer-only (HAWQ-V3 style).

Precondition: the graph went through :class:`~qcompile.passes.quantize_activations.QuantizeActivationsPass`
in static mode (every ``QuantizeAct`` static; dynamic scales are runtime floats). ``ranges`` maps
float value names of the graph (before quantization; the W8A8 pass keeps them) to a calibrated
absmax (:func:`~qcompile.passes.quantize_activations.collect_act_ranges` with ``values`` = all
float values); it is read where a value must become int8 codes and no ``QuantizeAct`` gives its scale.

Every float value is given an integer representation, tracked with its real scale (never stored
in the graph as a float tensor):

* codes: uint8, zero point 128, ``real = (u - 128) * s`` with one ``s`` per tensor;
* acc: int32, ``real = a * S[c]`` with ``S`` per tensor or per channel along one axis.

Rewrites, in graph order:

1. ``QuantizeAct(x)`` (static ``s``): on a float graph input it is kept (the input boundary);
   on int32 ``x`` read only by ``Int8Linear`` (in a transformer: layer-norm outputs, the
   attention context, the GELU output) it becomes per-row codes with a runtime power of two
   (``Requantize`` to int32, ``IntRowQuantize``: codes and ``2**r`` per row, see
   :meth:`~.integerize_nn.TransformerRules.row_codes`); on other integer ``x`` it becomes
   ``Requantize`` to codes of scale ``s`` (skipped when ``x`` is already codes of that scale).
2. ``Int8Linear(u, ., W, ws, b)`` -> ``IntLinear(u, W, round(b / (s_u * ws)) int32)``: acc with
   ``S = s_u * ws`` along the last axis. With per-row codes: ``IntLinear(u, W, b, 2**r)`` also
   multiplies each row's sum by its ``2**r`` before the bias (still 8-bit GEMM operands).
3. ``Conv(x, w, b)`` -> ``IntConv(codes(x), w_q int8, b int32)``, weights symmetric per output
   channel; acc with ``S = s_x * ws`` along axis 1.
4. ``Relu`` / ``Clip(min=0)`` -> ``Clip`` of the integers (min code 128, or int32 0).
5. ``MaxPool`` on the integers as they are (max commutes with a positive per-channel scale).
   ``AveragePool`` -> depthwise ``IntConv`` with a ones kernel (a window sum; ``1/count`` goes
   into the scale); ``GlobalAveragePool`` -> ``ReduceSum`` of int32 (``1/(H*W)`` into the scale).
6. ``Add(a, b)``: both operands are ``Requantize``d to int32 at one per-tensor scale, the finest
   of theirs but no finer than ``range(out) / 2**24`` (headroom against int32 overflow), and
   added in int32.
7. ``Reshape Transpose Slice Expand Identity Concat``: data movement on codes (an acc with
   per-channel scales is first requantized to codes by ``ranges``).
8. Each float graph output gets ``DequantizeLinear(int, scale, zero)`` (the output boundary).
9. Transformer ops (embedding tables, scalar and per-channel rescales, integer Mul/Div,
   nonlinear elementwise chains as lookup tables, attention matmuls, masks, Softmax, LayerNorm,
   ReduceSum/ReduceL2): the rules of :mod:`.integerize_nn`, mixed into the rewriter.

Boundary (the only float arithmetic left): the static ``QuantizeAct`` of each float graph input
(float -> int8 codes, inserted from ``ranges`` when absent) and the final ``DequantizeLinear``.

Refusals (:class:`UnsupportedOpError` / :class:`InputError` naming the node): any other op on an
integer value, a float value that is neither a graph input nor integer, dynamic ``QuantizeAct``,
an AveragePool whose window count varies (padding excluded, ceil_mode), a missing range.
Postcondition (``ensures``): every value produced or consumed by a node other than the two
boundary ops is an integer tensor.
"""

from __future__ import annotations

import logging

import numpy as np

from qcompile.errors import InputError, InvariantError, UnsupportedOpError
from qcompile.interpreter_integer import dyadic
from qcompile.ir import Graph, Node, TensorType

from .base import Pass, PassResult
from .integerize_nn import IntValue as _Int
from .integerize_nn import TransformerRules
from .quantize_activations import quantize_weight_per_channel

__all__ = ["IntegerizePass", "BOUNDARY_OPS", "integerize_w8a8", "float_value_ranges"]

logger = logging.getLogger(__name__)

BOUNDARY_OPS = ("QuantizeAct", "DequantizeLinear")
_MOVES = ("Reshape", "Transpose", "Slice", "Expand", "Identity")
_INT32_MAX = 2**31 - 1
_ADD_BITS = 24  # resolution of a residual sum: its calibrated range in 2**24 steps


def _is_float(dtype: str) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


class IntegerizePass(Pass):
    """Static W8A8 graph -> integer-only graph (see the module docstring)."""

    name = "IntegerizePass"

    def __init__(self, ranges: dict[str, float]):
        self.ranges = dict(ranges)

    def requires(self, graph: Graph) -> None:
        for node in graph.nodes:
            if node.op == "QuantizeAct" and node.attrs.get("mode") != "static":
                raise InputError(f"--integer-only needs static activation scales: node '{node.name}' "
                                 f"(QuantizeAct) is {node.attrs.get('mode')}")

    def call(self, graph: Graph) -> PassResult:
        g = graph.copy()
        rw = _Rewriter(g, self.ranges)
        for node in graph.nodes:
            rw.visit(node)
        for out in g.outputs:
            rw.dequantize_output(out)
        if not rw.changed:
            return PassResult(graph, False)
        g.nodes = rw.nodes
        declared = dict(g.values)
        g.remove_unused()
        for node in g.nodes:  # an unused output (the boundary QuantizeAct's scale) stays declared
            for name in node.outputs:
                g.values.setdefault(name, declared[name])
        g.metadata["integer_only"] = {"boundary": list(BOUNDARY_OPS), "rescales": rw.rescales}
        logger.info("IntegerizePass: %d nodes, %d dyadic rescales", len(g.nodes), rw.rescales)
        return PassResult(g, True)

    def ensures(self, graph: Graph) -> None:
        for node in graph.nodes:
            if node.op in BOUNDARY_OPS:
                continue
            for name in [*node.inputs, *node.outputs]:
                if name and _is_float(graph.type_of(name).dtype):
                    raise InvariantError(f"node '{node.name}' ({node.op}) still touches float value '{name}'")


class _Rewriter(TransformerRules):
    """Walks the graph once, emitting integer nodes into ``self.nodes``."""

    def __init__(self, g: Graph, ranges: dict):
        self.g, self.ranges = g, ranges
        self.nodes: list[Node] = []
        self.names: set[str] = {n.name for n in g.nodes}  # a replaced node frees its name (visit)
        self.rep: dict[str, _Int] = {}
        self.changed = False
        self.rescales = 0
        self.done: set[str] = set()  # nodes already replaced as part of a lookup-table chain
        self.never_true: set[str] = set()  # boolean values known to be all False (IsNaN of integers)
        self.users, self.producers = g.consumers(), g.producers()  # of the source graph (never edited)

    # -- helpers --------------------------------------------------------------------
    def _value(self, base: str, shape, dtype: str) -> str:
        return self.g.add_value(self.g.fresh_name(base), TensorType(tuple(shape), dtype))

    def _const(self, base: str, array) -> str:
        return self.g.add_constant(self.g.fresh_name(base), np.asarray(array))

    def _emit(self, op: str, name: str, inputs, outputs, attrs=None) -> None:
        unique, i = name, 0
        while unique in self.names:
            i += 1
            unique = f"{name}_{i}"
        self.names.add(unique)
        self.nodes.append(Node(op, unique, list(inputs), list(outputs), dict(attrs or {})))

    def _range_scale(self, value: str, node: Node) -> float:
        amax = self.ranges.get(value)
        if amax is None or not np.isfinite(amax) or amax <= 0:
            raise InputError(f"--integer-only: no calibrated range for '{value}' (input of node '{node.name}', "
                             f"{node.op})")
        return float(np.float32(amax) / np.float32(127))

    def get(self, value: str, node: Node) -> _Int:
        """The integer form of ``value``; a float graph input is quantized here (the boundary)."""
        if value in self.rep:
            return self.rep[value]
        if value in self.g.inputs and _is_float(self.g.type_of(value).dtype):
            return self._quantize_input(value, self._range_scale(value, node))
        raise UnsupportedOpError(node.op, node.name, f"--integer-only: input '{value}' is float and not a graph "
                                 "input (no integer version of its producer)")

    def _quantize_input(self, value: str, scale: float) -> _Int:
        t = self.g.type_of(value)
        u = self._value(f"{value}.codes", t.shape, "uint8")
        s = self._value(f"{value}.codes_scale", t.shape[:-1] + (1,), "float32")
        self._emit("QuantizeAct", f"{value}.quantize_input", [value], [u, s], {"mode": "static", "scale": scale})
        self.rep[value] = _Int(u, "codes", np.array([scale]))
        return self.rep[value]

    def requantize(self, src: _Int, kind: str, scale, base: str, qmin: int = -127) -> _Int:
        """``src`` rescaled to ``kind`` ("codes" | "acc") at per-tensor ``scale``."""
        scale = np.atleast_1d(np.asarray(scale, np.float64))
        if src.kind == kind and src.per_tensor and np.array_equal(src.scale, scale):
            return src
        m, s = dyadic(src.scale / scale[0])
        t = self.g.type_of(src.name)
        out = self._value(f"{base}.{kind}", t.shape, "uint8" if kind == "codes" else "int32")
        axis = src.axis % len(t.shape) if not src.per_tensor else -1
        attrs = {"axis": axis, "out_dtype": "uint8" if kind == "codes" else "int32"}
        if kind == "codes":
            attrs.update(qmin=qmin, qmax=127)
        self._emit("Requantize", f"{base}.requantize", [src.name, self._const(f"{base}.rq_m", m),
                                                         self._const(f"{base}.rq_s", s)], [out], attrs)
        self.rescales += 1
        return _Int(out, kind, scale)

    def codes(self, value: str, node: Node) -> _Int:
        src = self.get(value, node)
        if src.kind == "codes":
            return src
        return self.requantize(src, "codes", self._range_scale(value, node), value)

    def to_int32(self, src: _Int, base: str) -> str:
        if src.kind == "acc":
            return src.name
        t = self.g.type_of(src.name)
        wide = self._value(f"{base}.i32", t.shape, "int32")
        self._emit("Cast", f"{base}.widen", [src.name], [wide], {"to": "int32"})
        out = self._value(f"{base}.centered", t.shape, "int32")
        self._emit("Sub", f"{base}.center", [wide, self._const(f"{base}.zero_point", np.array([128], np.int32))],
                   [out])
        return out

    def _bias(self, node: Node, bias: str, scale: np.ndarray) -> np.ndarray | None:
        if not bias:
            return None
        b = np.rint(self.g.constants[bias].astype(np.float64) / scale)
        if np.abs(b).max(initial=0) > _INT32_MAX // 2:
            raise UnsupportedOpError(node.op, node.name, "--integer-only: bias does not fit int32 at the "
                                     "accumulator scale")
        return b.astype(np.int32)

    # -- rules ------------------------------------------------------------------------
    def visit(self, node: Node) -> None:
        rule = getattr(self, f"_r_{node.op}", None)
        if node.op in _MOVES:
            rule = self._move
        ints = [n for n in node.inputs if n and (n in self.rep or (n in self.g.inputs and _is_float(
            self.g.type_of(n).dtype)))]
        if node.name in self.done:
            return
        if not ints:  # a constant or non-float subgraph before the boundary, or a float leaf
            leaf = self.leaf_rule(node)
            if leaf is None:
                self.names.add(node.name)
                self.nodes.append(node)
                return
            self.changed = True
            return leaf(node)
        region = self.lut_region(node)
        if region is not None:
            return self.lower_lut(region)
        if rule is None:
            raise UnsupportedOpError(node.op, node.name, "--integer-only has no integer version of this op")
        self.changed = True
        if not (node.op == "QuantizeAct" and node.inputs[0] in self.g.inputs and node.inputs[0] not in self.rep):
            self.names.discard(node.name)
        rule(node)

    def _out(self, node: Node, kind: str, scale, axis: int = -1, index: int = 0, bound: int | None = None) -> str:
        name = node.outputs[index]
        t = self.g.type_of(name)
        new = self._value(f"{name}.{'codes' if kind == 'codes' else 'i32'}", t.shape,
                          "uint8" if kind == "codes" else "int32")
        self.rep[name] = _Int(new, kind, np.atleast_1d(np.asarray(scale, np.float64)), axis, bound)
        return new

    def _r_QuantizeAct(self, node: Node) -> None:
        x, scale = node.inputs[0], float(node.attrs["scale"])
        if x not in self.rep and x in self.g.inputs:
            self.names.add(node.name)
            self.nodes.append(node)
            self.rep[x] = self.rep[node.outputs[0]] = _Int(node.outputs[0], "codes", np.array([scale]))
            return
        src = self.get(x, node)
        if src.kind == "acc" and self.wants_row_codes(node):
            self.rep[node.outputs[0]] = self.row_codes(x, node)
            return
        self.rep[node.outputs[0]] = self.requantize(src, "codes", scale, node.outputs[0])

    def _r_Int8Linear(self, node: Node) -> None:
        src = self.get(node.inputs[0], node)
        if src.kind != "codes" or not src.per_tensor:
            raise InvariantError(f"node '{node.name}' (Int8Linear): input is not per-tensor codes")
        scale = src.scale[0] * self.g.constants[node.inputs[3]].astype(np.float64)
        bias = self._bias(node, node.inputs[4] if len(node.inputs) > 4 else "", scale)
        bias = None if bias is None else self._const(f"{node.name}.bias_i32", bias)
        out = self._out(node, "acc", scale, -1)
        attrs = {"wbits": node.attrs.get("wbits", 8)}
        inputs = [src.name, node.inputs[2], bias or "", src.row_mult or ""]
        while not inputs[-1]:  # optional inputs: no trailing empty names
            inputs.pop()
        self._emit("IntLinear", node.name, inputs, [out], attrs)

    def _r_Conv(self, node: Node) -> None:
        src = self.codes(node.inputs[0], node)
        w = self.g.constants.get(node.inputs[1])
        if w is None:
            raise UnsupportedOpError(node.op, node.name, "--integer-only needs a constant weight")
        cout = w.shape[0]
        q, ws = quantize_weight_per_channel(w.reshape(cout, -1).T.astype(np.float32), 8, False)
        scale = src.scale[0] * ws.astype(np.float64)
        ins = [src.name, self._const(f"{node.inputs[1]}.q", q.T.reshape(w.shape))]
        bias = self._bias(node, node.inputs[2] if len(node.inputs) > 2 else "", scale)
        if bias is not None:
            ins.append(self._const(f"{node.name}.bias_i32", bias))
        attrs = {k: v for k, v in node.attrs.items() if k in ("strides", "pads", "dilations", "group")}
        out = self._out(node, "acc", scale, 1)
        self._emit("IntConv", node.name, ins, [out], attrs)

    def _r_Relu(self, node: Node) -> None:
        src = self.get(node.inputs[0], node)
        out = self._out(node, src.kind, src.scale, src.axis)
        self._emit("Clip", node.name, [src.name], [out], {"min": 128 if src.kind == "codes" else 0, "max": None})

    def _r_Clip(self, node: Node) -> None:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
        if lo is not None and lo > 0 and hi is None and self.get(node.inputs[0], node).kind == "acc":
            return self.clip_low(node, float(lo))
        if lo in (None, 0, 0.0) and hi is None:
            return self._r_Relu(node) if lo is not None else self._alias(node)
        src = self.codes(node.inputs[0], node)
        s = src.scale[0]
        code = lambda v: int(np.clip(np.rint(v / s), -127, 127)) + 128  # noqa: E731
        out = self._out(node, "codes", s)
        self._emit("Clip", node.name, [src.name], [out], {"min": None if lo is None else code(lo),
                                                            "max": None if hi is None else code(hi)})

    def _alias(self, node: Node) -> None:
        self.rep[node.outputs[0]] = self.get(node.inputs[0], node)

    def _r_MaxPool(self, node: Node) -> None:
        src = self.get(node.inputs[0], node)
        out = self._out(node, src.kind, src.scale, src.axis)
        self._emit("MaxPool", node.name, [src.name], [out], node.attrs)

    def _r_AveragePool(self, node: Node) -> None:
        at = node.attrs
        if (any(at.get("pads") or ()) and not at.get("count_include_pad", 0)) or at.get("ceil_mode", 0):
            raise UnsupportedOpError(node.op, node.name, "--integer-only: the window count varies (padding "
                                     "excluded, or ceil_mode)")
        src = self.codes(node.inputs[0], node)
        channels, kernel = self.g.type_of(src.name).shape[1], tuple(at["kernel_shape"])
        ones = self._const(f"{node.name}.window", np.ones((channels, 1, *kernel), np.int8))
        out = self._out(node, "acc", src.scale[0] / float(np.prod(kernel)))
        attrs = {"strides": at.get("strides"), "pads": at.get("pads"), "group": channels}
        self._emit("IntConv", node.name, [src.name, ones], [out], {k: v for k, v in attrs.items() if v})

    def _r_GlobalAveragePool(self, node: Node) -> None:
        src = self.get(node.inputs[0], node)
        shape = self.g.type_of(src.name).shape
        wide = self.to_int32(src, node.outputs[0])
        out = self._out(node, "acc", src.scale / float(np.prod(shape[2:])), src.axis)
        self._emit("ReduceSum", node.name, [wide], [out], {"axes": tuple(range(2, len(shape))), "keepdims": True})

    def _r_Add(self, node: Node) -> None:
        ints = [n for n in node.inputs if n in self.rep]
        others = [n for n in node.inputs if n not in self.rep]
        mask = self.mask_operand(others[0]) if len(ints) == 1 and others else None
        if mask is not None:
            return self.masked_add(node, ints[0], mask)
        srcs = [self.get(n, node) for n in ints]
        scale = min(float(s.scale.min()) for s in srcs)
        amax = self.ranges.get(node.outputs[0])
        if amax is not None and np.isfinite(amax) and amax > 0:  # 2**24 steps over the range: no int32 overflow
            scale = max(scale, float(amax) / 2.0**_ADD_BITS)
        wide = []
        for i, n in enumerate(node.inputs):
            if n in self.rep:
                wide.append(self.requantize(self.rep[n], "acc", scale, f"{node.name}.in{i}").name)
            elif n in self.g.constants and _is_float(self.g.type_of(n).dtype):
                wide.append(self._const(f"{n}.i32", self._int32_at(node, self.g.constants[n], scale)))
            else:
                self.get(n, node)  # raises: a float operand with no integer version
        out = self._out(node, "acc", scale)
        self._emit("Add", node.name, wide, [out])

    def _int32_at(self, node: Node, array: np.ndarray, scale: float) -> np.ndarray:
        q = np.rint(array.astype(np.float64) / scale)
        if np.abs(q).max(initial=0) > _INT32_MAX // 2:
            raise UnsupportedOpError(node.op, node.name, "--integer-only: constant does not fit int32 at the sum's scale")
        return q.astype(np.int32)

    def _move(self, node: Node) -> None:
        src = self.get(node.inputs[0], node)
        if not src.per_tensor:
            src = self.codes(node.inputs[0], node)
        out = self._out(node, src.kind, src.scale)
        self._emit(node.op, node.name, [src.name, *node.inputs[1:]], [out], node.attrs)

    def _r_Concat(self, node: Node) -> None:
        scale = self._range_scale(node.outputs[0], node)
        parts = [self.requantize(self.get(n, node), "codes", scale, f"{node.name}.in{i}").name
                 for i, n in enumerate(node.inputs)]
        out = self._out(node, "codes", scale)
        self._emit("Concat", node.name, parts, [out], node.attrs)

    # -- output boundary ----------------------------------------------------------------
    def dequantize_output(self, out: str) -> None:
        src = self.rep.get(out)
        if src is None:
            return
        rank = len(self.g.type_of(out).shape)
        shape = (1,) if src.per_tensor else (src.scale.size,) + (1,) * (rank - 1 - src.axis % rank)
        scale = self._const(f"{out}.out_scale", src.scale.astype(np.float32).reshape(shape))
        zero = self._const(f"{out}.out_zero", np.array([128], np.uint8) if src.kind == "codes"
                           else np.array([0], np.int32))
        self._emit("DequantizeLinear", f"{out}.dequantize_output", [src.name, scale, zero], [out])


def float_value_ranges(graph: Graph, feeds_list) -> dict[str, float]:
    """Calibrated absmax of every float activation of ``graph`` (see ``collect_act_ranges``)."""
    from .quantize_activations import collect_act_ranges

    values = [n for n, v in graph.values.items() if _is_float(v.type.dtype) and n not in graph.constants]
    return collect_act_ranges(graph, feeds_list, values=values)


def integerize_w8a8(graph: Graph, config, calibration: dict | None = None) -> Graph:
    """The driver's ``integer_only`` path: static W8A8 (``config.bits`` 8 or 4), then :class:`IntegerizePass`.

    Calibrates on ``config.calib`` (npz), else ``calibration`` (eval inputs, split into samples),
    else synthesized inputs, like :func:`~qcompile.passes.quantize_activations.quantize_w8a8`.
    """
    from qcompile.pipeline import synthesize_inputs

    from . import calibrate
    from .quantize_activations import ActQuantConfig, QuantizeActivationsPass
    from .smooth_activations import smooth_for_static

    arrays = calibrate.load_npz(config.calib) if config.calib else calibration
    feeds = calibrate.split_batches(graph, arrays) if arrays is not None else [synthesize_inputs(graph)]
    graph = smooth_for_static(graph, feeds, config.smooth, "integer_only")
    ranges = float_value_ranges(graph, feeds)
    act = ActQuantConfig(weight_bits=int(config.bits), mode="static", ranges=ranges)
    g = QuantizeActivationsPass(act)(graph).graph
    return IntegerizePass(ranges)(g).graph
