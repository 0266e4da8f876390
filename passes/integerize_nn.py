"""Transformer rules of :class:`~qcompile.passes.integerize.IntegerizePass` (I-BERT style).

A mixin of the pass's rewriter (same invariants: every float value gets an integer
representation with a real scale tracked at compile time, see :mod:`.integerize`). These rules
make an encoder such as BERT / MiniLM integer-only:

* ``Gather(float table, ids)`` -> int8 table quantized per column (``Gather`` + ``Cast`` int32;
  acc with per-column scales along the last axis). ``Cast(int -> float)`` -> ``Cast`` int32 at
  scale 1 (masks, counts).
* ``Mul`` / ``Div`` by a positive scalar constant: only the tracked scale changes (no node).
  ``Mul(int, int)`` -> int32 ``Mul`` (scales multiply); ``Div(int, int)`` -> ``IntDiv`` at the
  output's fine scale.
* Elementwise chains with one integer input and a nonlinearity (erf-GELU, tanh, sigmoid, exp...)
  -> ``Requantize`` of the input to int32 at ``range / 511`` and one ``Lut`` of
  :data:`LUT_SIZE` int32 entries over ``[-range, range]`` (computed by the reference kernels of
  the float ops), output int32 at the fine scale ``range / 2**15`` of the exit value.
* Int32 inputs of linear layers -> 8-bit codes with a power-of-two scale per row chosen at run
  time (``IntRowQuantize``, :meth:`TransformerRules.row_codes`).
* ``MatMul(int, int)`` -> ``IntMatMul`` (codes with zero point 128, or int32 operands of known
  small magnitude such as softmax probabilities).
* ``Add(scores, Where(mask, 0, -3.4e38))`` (attention masks) -> ``Where(mask, scores, -2**30)``;
  ``Add`` with a float constant operand quantizes the constant at the sum's scale.
* ``Softmax`` (last axis) -> ``IntSoftmax`` (exp table, probabilities at 2**-15);
  ``IsNaN`` of an integer is never true, so ``Where(IsNaN(p), c, p)`` is ``p``.
* ``LayerNorm`` (last axis) -> ``IntLayerNorm`` (integer mean, variance, isqrt), output at the
  fine scale ``range / 2**15`` of its value; ``ReduceSum`` / ``ReduceL2`` / ``Clip(min > 0)`` of
  per-tensor int32 stay integer (``IntReduceL2`` takes an integer square root).

Refusals (UnsupportedOpError naming the node): negative scalar multipliers, a normalisation or
softmax not over the last axis, per-channel operands where one scale per tensor is needed and no
calibrated range exists to requantize them, a nonlinear chain with more than one exit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcompile.errors import UnsupportedOpError
from qcompile.interpreter_integer import CODE_ZERO, dyadic
from qcompile.interpreter_integer_nn import ROW_CODE_BITS, SOFTMAX_OUT_BITS
from qcompile.ir import Node

__all__ = ["TransformerRules", "IntValue", "LUT_OPS", "NONLINEAR_OPS"]

LUT_OPS = frozenset("Add Sub Mul Div Erf Tanh Sigmoid Exp Relu Gelu Sqrt Neg Abs Pow Clip".split())
NONLINEAR_OPS = frozenset("Erf Tanh Sigmoid Exp Gelu Sqrt Pow".split())
FINE_BITS = 15  # int32 values that stay int32 (norm outputs, quotients) resolve their range in 2**15 steps
MASK_FILL = -(1 << 30)  # an attention-mask entry: far below any score, no int32 overflow in max - x
SENTINEL = 1e30
EXP_STEPS = 256  # IntSoftmax table: exp(-i / 256), i < 16 * 256
EXP_TABLE = 16 * EXP_STEPS
LUT_SIZE = 1024  # entries of a nonlinear chain's table over [-range, range] of its input
_SMALL = 1 << 16  # int32 operands of IntMatMul up to this magnitude are used as they are
_INT32_MAX = 2**31 - 1
MAX_ROW_SHIFT = 8  # IntRowQuantize: rows down to range / 2**8 keep 7-bit codes


@dataclass(frozen=True)
class IntValue:
    """Integer representation of one float value: new name, kind, scale (float64), axis."""

    name: str
    kind: str  # "codes" | "acc"
    scale: np.ndarray
    axis: int = -1
    bound: int | None = None  # known largest |integer| (e.g. softmax probabilities), if any
    row_mult: str | None = None  # codes with a runtime power of two per row: real = (u - 128) * scale * mult

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1


def row_max_shift(k: int) -> int:
    """Largest per-row shift ``r`` with ``127 * 127 * k * 2**(r + 1) <= 2**31`` (GEMM sum, shifted, plus bias)."""
    return int(min(MAX_ROW_SHIFT, max(0, math.floor(math.log2(_INT32_MAX / (127.0 * 127.0 * k))) - 1)))


def _scalar(g, name: str) -> float | None:
    arr = g.constants.get(name)
    if arr is None or arr.size != 1 or not np.issubdtype(arr.dtype, np.floating):
        return None
    return float(arr.reshape(()))


class TransformerRules:
    """Rules for the ops of transformer encoders; mixed into the integerize rewriter."""

    # -- helpers ------------------------------------------------------------------------
    def fine_scale(self, value: str, node: Node) -> float:
        return self._range_scale(value, node) * 127.0 / 2.0**FINE_BITS

    def _magnitude(self, src, value: str) -> float:
        """Calibrated largest |integer| of ``src`` (the integer form of float ``value``)."""
        if src.bound is not None:
            return float(src.bound)
        if src.kind == "codes":
            return 127.0
        amax = self.ranges.get(value)
        return math.inf if amax is None else float(amax) / float(src.scale.min())

    def per_tensor_int32(self, value: str, node: Node):
        """``value`` as int32 with one scale (per-channel accumulators are requantized)."""
        src = self.get(value, node)
        if not src.per_tensor:
            src = self.requantize(src, "acc", self.fine_scale(value, node), value)
        if src.kind == "codes":
            return IntValue(self.to_int32(src, value), "acc", src.scale, bound=127)
        return src

    def codes_int32(self, value: str, node: Node):
        """``value`` as int32 ``codes - 128`` (8-bit magnitude)."""
        src = self.codes(value, node)
        return IntValue(self.to_int32(src, value), "acc", src.scale, bound=127)

    # -- leaves: nodes without integer inputs that produce float ----------------------
    def leaf_rule(self, node: Node):
        """The rule for a node with no integer input that must become integer, or None."""
        if node.op == "Gather" and node.inputs[0] in self.g.constants and self._is_float_value(node.inputs[0]):
            return self._gather_table
        if node.op == "Cast" and not self._is_float_value(node.inputs[0]) and self._is_float_value(node.outputs[0]):
            return self._cast_to_int
        return None

    def _is_float_value(self, name: str) -> bool:
        return np.issubdtype(np.dtype(self.g.type_of(name).dtype), np.floating)

    def _gather_table(self, node: Node) -> None:
        table = self.g.constants[node.inputs[0]].astype(np.float64)
        if node.attrs.get("axis", 0) != 0 or table.ndim != 2:
            raise UnsupportedOpError(node.op, node.name, "--integer-only gathers rows of a 2-D table only")
        scale = np.maximum(np.abs(table).max(axis=0), 1e-12) / 127.0
        q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
        out_t = self.g.type_of(node.outputs[0])
        rows = self._value(f"{node.outputs[0]}.i8", out_t.shape, "int8")
        self._emit("Gather", node.name, [self._const(f"{node.inputs[0]}.q", q), node.inputs[1]], [rows],
                   {"axis": 0})
        out = self._out(node, "acc", scale, -1)
        self._emit("Cast", f"{node.name}.widen", [rows], [out], {"to": "int32"})

    def _cast_to_int(self, node: Node) -> None:
        out = self._out(node, "acc", 1.0)
        self._emit("Cast", node.name, [node.inputs[0]], [out], {"to": "int32"})

    # -- scalar scale changes and elementwise integer arithmetic ------------------------
    def _rescaled(self, node: Node, factor: float) -> None:
        if not factor > 0:
            raise UnsupportedOpError(node.op, node.name, f"--integer-only: scalar factor {factor} is not positive")
        src = self.get(node.inputs[0], node)
        self.rep[node.outputs[0]] = IntValue(src.name, src.kind, src.scale * factor, src.axis, src.bound)

    def _r_Mul(self, node: Node) -> None:
        a, b = node.inputs
        for x, c in ((a, b), (b, a)):
            k = _scalar(self.g, c)
            if k is not None and x in self.rep:
                return self._rescaled(Node(node.op, node.name, [x], node.outputs), k)
            if x in self.rep and self._channel_vector(c, x) is not None:
                return self._rescaled_channels(node, x, self._channel_vector(c, x))
        sa, sb = (self.per_tensor_int32(v, node) for v in (a, b))
        if self._magnitude(sa, a) * self._magnitude(sb, b) >= 2.0**30:
            sa, sb = (self.codes_int32(v, node) for v in (a, b))
        out = self._out(node, "acc", sa.scale * sb.scale)
        self._emit("Mul", node.name, [sa.name, sb.name], [out])

    def _channel_vector(self, const: str, x: str) -> np.ndarray | None:
        """A positive float constant that varies along the last axis of ``x`` only, as a vector."""
        arr = self.g.constants.get(const)
        rank = len(self.g.type_of(x).shape)
        if arr is None or not np.issubdtype(arr.dtype, np.floating) or arr.ndim > rank or arr.ndim == 0:
            return None
        if any(d != 1 for d in arr.shape[:-1]) or arr.shape[-1] != self.g.type_of(x).shape[-1]:
            return None
        vec = arr.reshape(-1).astype(np.float64)
        return vec if np.all(vec > 0) else None

    def _rescaled_channels(self, node: Node, x: str, vec: np.ndarray) -> None:
        src = self.get(x, node)
        rank = len(self.g.type_of(x).shape)
        if not src.per_tensor and src.axis % rank != rank - 1:
            src = self.requantize(src, "acc", self.fine_scale(x, node), x)
        self.rep[node.outputs[0]] = IntValue(src.name, src.kind, src.scale * vec, rank - 1)

    def _r_Div(self, node: Node) -> None:
        a, b = node.inputs
        k = _scalar(self.g, b)
        if k is not None:
            return self._rescaled(node, 1.0 / k)
        sa, sb = (self.per_tensor_int32(v, node) for v in (a, b))
        scale = self.fine_scale(node.outputs[0], node)
        ratio = float(sa.scale[0]) / (float(sb.scale[0]) * scale)
        shift = max(0, 24 - math.ceil(math.log2(ratio)))
        num, den = int(round(ratio * 2**shift)), 1 << shift
        out = self._out(node, "acc", scale)
        self._emit("IntDiv", node.name, [sa.name, sb.name], [out], {"num": num, "den": den})

    # -- nonlinear elementwise chains -> lookup tables ------------------------------------
    def lut_region(self, node: Node):
        """(members in graph order, exit value) of the nonlinear chain starting at ``node``, or None."""
        if node.op not in LUT_OPS:
            return None
        live = [n for n in node.inputs if n and n not in self.g.constants]
        if len(live) != 1 or live[0] not in self.rep or any(
                n in self.g.constants and self.g.constants[n].size != 1 for n in node.inputs if n):
            return None
        x = live[0]
        users = self.users
        members, produced = [node], set(node.outputs)
        grew = True
        while grew:
            grew = False
            for v in sorted(produced):
                for c in users.get(v, []):
                    if c in members or c.op not in LUT_OPS:
                        continue
                    if all(not n or n == x or n in produced or (n in self.g.constants and self.g.constants[n].size == 1)
                           for n in c.inputs):
                        members.append(c)
                        produced.update(c.outputs)
                        grew = True
        if not any(m.op in NONLINEAR_OPS for m in members):
            return None
        exits = [v for v in produced if v in self.g.outputs or any(c not in members for c in users.get(v, []))]
        if len(exits) != 1:
            return None
        order = {n.name: i for i, n in enumerate(self.g.nodes)}
        return sorted(members, key=lambda n: order[n.name]), exits[0], x

    def lower_lut(self, region) -> None:
        """Replace the chain by ``Lut(x at a fine step, table)``; the table evaluates the float ops on its grid.

        ``x`` is requantized to int32 at ``range(x) / (LUT_SIZE / 2 - 1)``, the table covers
        ``[-range, range]`` (an input beyond saturates, as a code would) and holds the exit value
        as int32 at its fine scale ``range / 2**15``.
        """
        from qcompile.interpreter import KERNELS  # noqa: PLC0415  (no import cycle at module load)

        members, exit_value, x = region
        first = members[0]
        half = LUT_SIZE // 2
        step = self._range_scale(x, first) * 127.0 / (half - 1)
        src = self.requantize(self.get(x, first), "acc", step, f"{x}.lut_in")
        env = {x: ((np.arange(LUT_SIZE, dtype=np.float64) - half) * step).astype(np.float32)}
        for m in members:
            args = [env.get(n, self.g.constants.get(n)) if n else None for n in m.inputs]
            with np.errstate(all="ignore"):
                outs = KERNELS[m.op](self.g, m, args)
            for name, arr in zip(m.outputs, outs if isinstance(outs, (list, tuple)) else [outs]):
                env[name] = np.asarray(arr, np.float32).reshape(LUT_SIZE)
        scale = self.fine_scale(exit_value, first)
        values = np.clip(np.rint(env[exit_value].astype(np.float64) / scale), -(2**30), 2**30)
        table = np.nan_to_num(values).astype(np.int32)
        for m in members:
            self.done.add(m.name)
            self.names.discard(m.name)
        self.changed = True
        exit_node = Node("Lut", members[-1].name, [x], [exit_value])
        out = self._out(exit_node, "acc", scale, bound=int(np.abs(table).max()))
        self._emit("Lut", f"{exit_value}.lut", [src.name, self._const(f"{exit_value}.table", table)], [out],
                   {"offset": half})

    # -- dynamic per-row codes of linear-layer inputs -------------------------------------
    def wants_row_codes(self, node: Node) -> bool:
        """Whether ``QuantizeAct`` ``node`` of an int32 value becomes per-row codes (all readers Int8Linear)."""
        return all(c.op == "Int8Linear" for c in self.users.get(node.outputs[0], []))

    def row_codes(self, value: str, node: Node) -> IntValue:
        """``value`` (int32) as 8-bit codes with a runtime power of two per row (``IntRowQuantize``).

        The row's int32 form is at ``ref = range / 2**(7 + max_shift)``; a row whose largest
        ``|x|`` is ``a`` keeps ``x >> r`` with ``r = clip(bit_length(a) - 7, 0, max_shift)``, so a
        row down to ``range / 2**max_shift`` has full 7-bit codes; ``max_shift`` keeps ``acc << r``
        of the following GEMM inside int32 (:func:`row_max_shift`).
        """
        t = self.g.type_of(value)
        max_shift = row_max_shift(t.shape[-1])
        ref = self._range_scale(value, node) * 127.0 / 2.0 ** (ROW_CODE_BITS + max_shift)
        wide = self.requantize(self.get(value, node), "acc", ref, f"{value}.rows")
        codes = self._value(f"{value}.row_codes", t.shape, "uint8")
        mult = self._value(f"{value}.row_mult", t.shape[:-1] + (1,), "int32")
        self._emit("IntRowQuantize", f"{value}.row_quantize", [wide.name], [codes, mult], {"max_shift": max_shift})
        return IntValue(codes, "codes", np.array([ref]), row_mult=mult)

    # -- attention -------------------------------------------------------------------------
    def _matmul_operand(self, value: str, node: Node):
        src = self.get(value, node)
        if src.kind == "codes" and src.per_tensor:
            return src, CODE_ZERO
        if src.kind == "acc" and src.per_tensor and src.bound is not None and src.bound <= _SMALL:
            return src, 0
        return self.codes(value, node), CODE_ZERO

    def _r_MatMul(self, node: Node) -> None:
        (sa, za), (sb, zb) = (self._matmul_operand(v, node) for v in node.inputs)
        out = self._out(node, "acc", sa.scale * sb.scale)
        self._emit("IntMatMul", node.name, [sa.name, sb.name], [out], {"a_zero": za, "b_zero": zb})

    def mask_operand(self, value: str):
        """(condition, keep_when) if ``value`` is ``Where(cond, 0, sentinel)`` (or swapped), else None."""
        producer = self.producers.get(value)
        if producer is None or producer.op != "Where":
            return None
        cond, c_true, c_false = producer.inputs
        t, f = _scalar(self.g, c_true), _scalar(self.g, c_false)
        if t is None or f is None:
            return None
        if t == 0.0 and f <= -SENTINEL:
            return cond, True
        if f == 0.0 and t <= -SENTINEL:
            return cond, False
        return None

    def masked_add(self, node: Node, scores: str, mask) -> None:
        src = self.per_tensor_int32(scores, node)
        cond, keep_when = mask
        fill = self._const(f"{node.name}.mask_fill", np.array(MASK_FILL, np.int32))
        branches = [src.name, fill] if keep_when else [fill, src.name]
        out = self._out(node, "acc", src.scale)
        self._emit("Where", node.name, [cond, *branches], [out])

    def _r_Softmax(self, node: Node) -> None:
        rank = len(self.g.type_of(node.inputs[0]).shape)
        if node.attrs.get("axis", -1) % rank != rank - 1:
            raise UnsupportedOpError(node.op, node.name, "--integer-only: softmax over a non-last axis")
        src = self.per_tensor_int32(node.inputs[0], node)
        m, s = dyadic(float(src.scale[0]) * EXP_STEPS)
        table = np.rint(2.0**SOFTMAX_OUT_BITS * np.exp(-np.arange(EXP_TABLE) / EXP_STEPS)).astype(np.int32)
        out = self._out(node, "acc", 2.0**-SOFTMAX_OUT_BITS, bound=1 << SOFTMAX_OUT_BITS)
        self._emit("IntSoftmax", node.name, [src.name, self._const(f"{node.name}.exp_table", table)], [out],
                   {"mult": int(m[0]), "shift": int(s[0])})

    def _r_IsNaN(self, node: Node) -> None:
        self.get(node.inputs[0], node)
        self.never_true.add(node.outputs[0])

    def _r_Where(self, node: Node) -> None:
        cond, a, b = node.inputs
        if cond in self.never_true:
            self.rep[node.outputs[0]] = self.get(b, node)
            return
        raise UnsupportedOpError(node.op, node.name, "--integer-only: Where on integer values (other than the "
                                 "IsNaN guard of a softmax)")

    # -- normalisation and reductions ---------------------------------------------------
    def _r_LayerNorm(self, node: Node) -> None:
        x = node.inputs[0]
        rank = len(self.g.type_of(x).shape)
        if node.attrs.get("axis", -1) % rank != rank - 1:
            raise UnsupportedOpError(node.op, node.name, "--integer-only: LayerNorm over more than the last axis")
        src = self.per_tensor_int32(x, node)
        pre_shift = max(0, math.ceil(math.log2(max(self._magnitude(src, x), 1.0))) - FINE_BITS)
        out_scale = self.fine_scale(node.outputs[0], node)
        gamma = self.g.constants[node.inputs[1]].astype(np.float64) / out_scale
        beta = (self.g.constants[node.inputs[2]].astype(np.float64) / out_scale if len(node.inputs) > 2
                and node.inputs[2] else np.zeros_like(gamma))
        out_shift = 22 + 20 - math.floor(math.log2(max(np.abs(gamma).max(), 1e-30)))
        g_q = np.rint(gamma * 2.0 ** (out_shift - 22)).astype(np.int64)
        out = self._out(node, "acc", out_scale)
        self._emit("IntLayerNorm", node.name, [src.name, self._const(f"{node.name}.gamma_q", g_q),
                                                self._const(f"{node.name}.beta_q", np.rint(beta).astype(np.int64))],
                   [out], {"pre_shift": pre_shift, "out_shift": out_shift})

    def _r_ReduceSum(self, node: Node) -> None:
        src = self.per_tensor_int32(node.inputs[0], node)
        out = self._out(node, "acc", src.scale)
        self._emit("ReduceSum", node.name, [src.name], [out], node.attrs)

    def _r_ReduceL2(self, node: Node) -> None:
        src = self.per_tensor_int32(node.inputs[0], node)
        out = self._out(node, "acc", src.scale)
        self._emit("IntReduceL2", node.name, [src.name], [out], node.attrs)

    def clip_low(self, node: Node, low: float) -> None:
        """``Clip(x, min=low > 0)`` of an int32 value: the integer bound ``ceil(low / scale)``."""
        src = self.per_tensor_int32(node.inputs[0], node)
        out = self._out(node, "acc", src.scale)
        self._emit("Clip", node.name, [src.name], [out],
                   {"min": max(1, math.ceil(low / float(src.scale[0]))), "max": None})
