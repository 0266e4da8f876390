"""ONNX -> IR converters for QOperator-format models (onnxruntime's ``quantize_static``).

Integer stages stay integer: convolutions and matrix products become ``ConvInteger`` /
``MatMulInteger`` (int32 accumulation, explicit zero points), an int32 bias is an integer
``Add``; only the final rescale is float, because onnxruntime's is. Numerics follow
onnxruntime's CPU kernels (MLAS) bit for bit:

* Requantization (``MlasRequantizeOutput``): ``y = saturate(rne(float32(acc) * M) + zp_y)``
  with ``M`` computed in float32 in onnxruntime's order: ``x_s * w_s[c] / y_s`` (QLinearConv,
  QLinearMatMul), ``alpha * a_s * b_s[n] / y_s`` (QGemm), ``x_s / (y_s * float(HW))``
  (QLinearGlobalAveragePool, whose accumulator is ``sum(x) - zp_x * HW``). It is emitted as
  ``Cast(float32) -> Mul(M) -> QuantizeLinear(scale 1, zp_y)``: exactly the same float ops
  (``v / 1`` is exact), no new op. QGemm without ``y_scale`` stops after the ``Mul``.
* ``com.microsoft.QLinearAdd`` / ``QLinearMul`` / ``QLinearAveragePool`` -> IR ops of the same
  name (MLAS's AVX2 fused multiply-adds / SSE2 multiply then add / a float32 window sum, see
  :mod:`qcompile.interpreter_qoperator`): no integer formulation reproduces their float rounding.
* ``com.microsoft.QLinearLeakyRelu`` / ``QLinearSigmoid`` / ``QLinearConcat`` (inputs whose
  scale or zero point differ from the output's): onnxruntime evaluates a 256-entry table,
  dequantize -> op -> quantize, in float32; so do we, at import (:mod:`.qoperator_tables`),
  and the op becomes ``Gather(table, x)`` (int8 codes index with wrap-around, as ONNX
  Gather's negative indices do).

* ``com.microsoft.QLinearSoftmax`` (uint8, opset >= 13 semantics, last axis) -> IR
  ``QLinearSoftmax`` with onnxruntime's float32 exp table (:func:`.qoperator_tables.softmax_table`).

Refusals (:class:`UnsupportedOpError`): scales/zero points computed at run time, a per-axis
activation zero point, 16-bit or 4-bit QOperator types, non-2-D QGemm operands.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedOpError
from .onnx_nn import _explicit_pads, conv_geometry
from .onnx_ops import inp, need_const
from .onnx_quant import QRANGE, _as_storage, _recipe
from .qoperator_tables import lookup_table, mlas_logistic, softmax_table

__all__ = ["QOP_CONVERTERS", "QOP_DOMAIN_CONVERTERS"]

_F32 = np.float32


# ---------------------------------------------------------------------------- helpers
def _scalar(ctx, node, i: int, what: str):
    """A per-tensor scale / zero point (a 1-element constant) as a numpy scalar."""
    value = need_const(ctx, node, i, what)
    if value is None:
        return None
    if value.size != 1:
        raise UnsupportedOpError(node.op_type, ctx.current, f"{what} must be per tensor (got shape {value.shape})")
    return value.reshape(())


def _zero_point(ctx, node, i: int, like: str):
    """Zero point input ``i`` as (storage array, logical dtype); absent -> 0 of ``like``'s dtype."""
    zp = need_const(ctx, node, i, "zero point")
    if zp is None:
        dtype = str(ctx.type_of(like).dtype)
        return np.zeros((), dtype), dtype
    zp, logical = _as_storage(zp, ctx, node)
    if logical not in ("int8", "uint8"):
        raise UnsupportedOpError(node.op_type, ctx.current, f"{logical} QOperator tensors (8-bit only)")
    return zp, logical


def requantize(ctx, acc: str, multiplier: np.ndarray, zp: np.ndarray, logical: str, out: str, tag: str = "y") -> str:
    """int32 ``acc`` -> saturate(rne(float32(acc) * multiplier) + zp), MLAS's requantization.

    ``multiplier`` (float32) and ``zp`` must broadcast against ``acc``."""
    qmin, qmax, storage = QRANGE[logical]
    f = ctx.emit("Cast", [acc], {"to": "float32"})[0]
    scaled = ctx.emit("Mul", [f, ctx.new_const(f"{ctx.current}_{tag}_multiplier", np.asarray(multiplier, _F32))])[0]
    ins = [scaled, ctx.new_const(f"{ctx.current}_{tag}_one", _F32(1)),
           ctx.new_const(f"{ctx.current}_{tag}_zero_point", np.asarray(zp).astype(storage))]
    return ctx.emit("QuantizeLinear", ins, {"qmin": qmin, "qmax": qmax, "dtype": storage}, [out])[0]


def _channel_view(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    values = np.asarray(values).reshape(-1)
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis] = values.size
    return values.reshape(shape)


def _record(ctx, op: str, source: str, **extra) -> None:
    _recipe(ctx, {"node": ctx.graph.nodes[-1].name if ctx.graph.nodes else ctx.current, "op": op,
                  "source": source, "bits": 8, **extra})


# ---------------------------------------------------------------------------- convolution
def _conv_integer_node(ctx, node, attrs, x, w, x_zp, w_zp, out: str = "") -> str:
    """Emit ``ConvInteger(x, w, x_zp, w_zp)`` with explicit pads; returns the int32 output."""
    ws = ctx.type_of(w).shape
    strides, pads, dilations = conv_geometry(ctx, node, attrs, x, w)
    if w_zp is not None and np.asarray(w_zp).size not in (1, ws[0]):
        raise UnsupportedOpError(node.op_type, ctx.current, "w_zero_point must be per tensor or per output channel")
    ins = [x, w,
           ctx.new_const(f"{ctx.current}_x_zero_point", np.asarray(x_zp).reshape(())) if x_zp is not None else "",
           ctx.new_const(f"{ctx.current}_w_zero_point", np.asarray(w_zp).reshape(-1)) if w_zp is not None else ""]
    while ins[-1] == "":
        ins.pop()
    out_attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": int(attrs.get("group", 1))}
    return ctx.emit("ConvInteger", ins, out_attrs, [out])[0]


def _conv_integer(ctx, node, attrs):
    x, w = inp(ctx, node, 0), inp(ctx, node, 1)
    x_zp = _scalar(ctx, node, 2, "x_zero_point") if inp(ctx, node, 2) else None
    w_zp = need_const(ctx, node, 3, "w_zero_point")
    _conv_integer_node(ctx, node, attrs, x, w, x_zp, w_zp, node.output[0])
    _record(ctx, "ConvInteger", "ConvInteger", shape=list(ctx.type_of(w).shape))


def _qlinear_conv(ctx, node, attrs):
    """QLinearConv(x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp, B?) -> ConvInteger (+ B) -> requantize."""
    x, w = inp(ctx, node, 0), inp(ctx, node, 3)
    x_s, y_s = _scalar(ctx, node, 1, "x_scale").astype(_F32), _scalar(ctx, node, 6, "y_scale").astype(_F32)
    x_zp, _ = _zero_point(ctx, node, 2, x)
    w_s = need_const(ctx, node, 4, "w_scale").astype(_F32).reshape(-1)
    w_zp = need_const(ctx, node, 5, "w_zero_point")
    y_zp, logical = _zero_point(ctx, node, 7, x)
    acc = _conv_integer_node(ctx, node, attrs, x, w, x_zp, w_zp)
    rank = len(ctx.type_of(acc).shape)
    if inp(ctx, node, 8):
        bias = need_const(ctx, node, 8, "B").astype(np.int32)
        acc = ctx.emit("Add", [acc, ctx.new_const(f"{ctx.current}_bias", _channel_view(bias, rank, 1))])[0]
    multiplier = (x_s * w_s) / y_s  # float32, onnxruntime's order
    requantize(ctx, acc, _channel_view(multiplier, rank, 1), y_zp, logical, node.output[0])
    _record(ctx, "QLinearConv", "QLinearConv", shape=list(ctx.type_of(w).shape),
            granularity="per_tensor" if w_s.size == 1 else "per_axis(0)", dtype=logical)


# ---------------------------------------------------------------------------- matrix products
def _matmul_integer_node(ctx, node, a, b, a_zp, b_zp) -> str:
    ins = [a, b, ctx.new_const(f"{ctx.current}_a_zero_point", np.asarray(a_zp).reshape(())),
           ctx.new_const(f"{ctx.current}_b_zero_point", np.asarray(b_zp).reshape(-1) if np.asarray(b_zp).size > 1
                         else np.asarray(b_zp).reshape(()))]
    if len(ctx.type_of(b).shape) != 2 and np.asarray(b_zp).size > 1:
        raise UnsupportedOpError(node.op_type, ctx.current, "per-column b_zero_point needs a 2-D B")
    return ctx.emit("MatMulInteger", ins)[0]


def _qlinear_matmul(ctx, node, attrs):
    """QLinearMatMul(a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp) -> MatMulInteger -> requantize."""
    a, b = inp(ctx, node, 0), inp(ctx, node, 3)
    a_s, y_s = _scalar(ctx, node, 1, "a_scale").astype(_F32), _scalar(ctx, node, 6, "y_scale").astype(_F32)
    a_zp, _ = _zero_point(ctx, node, 2, a)
    b_s = need_const(ctx, node, 4, "b_scale").astype(_F32).reshape(-1)
    b_zp, _ = _zero_point(ctx, node, 5, b)
    y_zp, logical = _zero_point(ctx, node, 7, a)
    acc = _matmul_integer_node(ctx, node, a, b, a_zp, b_zp)
    requantize(ctx, acc, (a_s * b_s) / y_s, y_zp, logical, node.output[0])
    _record(ctx, "QLinearMatMul", "QLinearMatMul", shape=list(ctx.type_of(b).shape), dtype=logical)


def _qgemm(ctx, node, attrs):
    """com.microsoft.QGemm(a, a_s, a_zp, b, b_s, b_zp, C?, y_s?, y_zp?): int32 GEMM + C, then
    requantize (y_scale given) or scale to float32 (y_scale absent)."""
    a, b = inp(ctx, node, 0), inp(ctx, node, 3)
    if len(ctx.type_of(a).shape) != 2 or len(ctx.type_of(b).shape) != 2:
        raise UnsupportedOpError("com.microsoft.QGemm", ctx.current, "A and B must be 2-D")
    if attrs.get("transA", 0):
        a = ctx.emit("Transpose", [a], {"perm": (1, 0)})[0]
    if attrs.get("transB", 0):
        b = ctx.emit("Transpose", [b], {"perm": (1, 0)})[0]
    a_s = _scalar(ctx, node, 1, "a_scale").astype(_F32)
    a_zp, _ = _zero_point(ctx, node, 2, a)
    b_s = need_const(ctx, node, 4, "b_scale").astype(_F32).reshape(-1)
    b_zp, _ = _zero_point(ctx, node, 5, b)
    acc = _matmul_integer_node(ctx, node, a, b, a_zp, b_zp)
    if inp(ctx, node, 6):
        bias = ctx.new_const(f"{ctx.current}_C", need_const(ctx, node, 6, "C").astype(np.int32))
        acc = ctx.emit("Add", [acc, bias])[0]
    scale = _F32(attrs.get("alpha", 1.0)) * a_s * b_s
    if inp(ctx, node, 7):
        y_zp, logical = _zero_point(ctx, node, 8, a)
        requantize(ctx, acc, scale / _scalar(ctx, node, 7, "y_scale").astype(_F32), y_zp, logical, node.output[0])
    else:
        f = ctx.emit("Cast", [acc], {"to": "float32"})[0]
        ctx.emit("Mul", [f, ctx.new_const(f"{ctx.current}_scale", scale)], {}, [node.output[0]])
    _record(ctx, "QGemm", "com.microsoft.QGemm", shape=list(ctx.type_of(b).shape))


# ---------------------------------------------------------------------------- elementwise
def _qparams(ctx, node, si, zi, like):
    s = _scalar(ctx, node, si, "scale").astype(_F32)
    zp, logical = _zero_point(ctx, node, zi, like)
    return s, zp, logical


def _qlinear_add(ctx, node, attrs):
    """com.microsoft.QLinearAdd(a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp) -> IR QLinearAdd."""
    a, b = inp(ctx, node, 0), inp(ctx, node, 3)
    a_s, a_zp, _ = _qparams(ctx, node, 1, 2, a)
    b_s, b_zp, _ = _qparams(ctx, node, 4, 5, b)
    c_s, c_zp, logical = _qparams(ctx, node, 6, 7, a)
    with np.errstate(invalid="ignore", divide="ignore"):  # inf / inf: a calibrated mask's scale, NaN as in C++
        ra, rb = a_s / c_s, b_s / c_s
    fixed = _F32(int(c_zp)) - (ra * _F32(int(a_zp)) + rb * _F32(int(b_zp)))
    qmin, qmax, storage = QRANGE[logical]
    ctx.emit("QLinearAdd", [a, b], {"a_ratio": float(ra), "b_ratio": float(rb), "fixed": float(fixed),
                                    "qmin": qmin, "qmax": qmax, "dtype": storage}, [node.output[0]])
    _record(ctx, "QLinearAdd", "com.microsoft.QLinearAdd", dtype=logical)


def _qlinear_mul(ctx, node, attrs):
    """com.microsoft.QLinearMul -> IR QLinearMul with ratio = a_s * b_s / c_s (float32)."""
    a, b = inp(ctx, node, 0), inp(ctx, node, 3)
    a_s, a_zp, _ = _qparams(ctx, node, 1, 2, a)
    b_s, b_zp, _ = _qparams(ctx, node, 4, 5, b)
    c_s, c_zp, logical = _qparams(ctx, node, 6, 7, a)
    qmin, qmax, storage = QRANGE[logical]
    ir_attrs = {"a_zero_point": int(a_zp), "b_zero_point": int(b_zp), "ratio": float(a_s * b_s / c_s),
                "c_zero_point": float(int(c_zp)), "qmin": qmin, "qmax": qmax, "dtype": storage}
    ctx.emit("QLinearMul", [a, b], ir_attrs, [node.output[0]])
    _record(ctx, "QLinearMul", "com.microsoft.QLinearMul", dtype=logical)


def _qlinear_global_average_pool(ctx, node, attrs):
    """com.microsoft.QLinearGlobalAveragePool: sum(x) - zp_x * HW in int32, then requantize by
    x_s / (y_s * HW)."""
    x = inp(ctx, node, 0)
    shape = ctx.type_of(x).shape
    x_s, x_zp, _ = _qparams(ctx, node, 1, 2, x)
    y_s, y_zp, logical = _qparams(ctx, node, 3, 4, x)
    axes = tuple(range(1, len(shape) - 1)) if attrs.get("channels_last", 0) else tuple(range(2, len(shape)))
    image = int(np.prod([shape[i] for i in axes]))
    x32 = ctx.emit("Cast", [x], {"to": "int32"})[0]
    acc = ctx.emit("ReduceSum", [x32], {"axes": axes, "keepdims": True})[0]
    acc = ctx.emit("Add", [acc, ctx.new_const(f"{ctx.current}_bias", np.int32(-int(x_zp) * image))])[0]
    requantize(ctx, acc, x_s / (y_s * _F32(image)), y_zp, logical, node.output[0])
    _record(ctx, "QLinearGlobalAveragePool", "com.microsoft.QLinearGlobalAveragePool", dtype=logical)


def _qlinear_average_pool(ctx, node, attrs):
    """com.microsoft.QLinearAveragePool (2-D NCHW, floor mode) -> IR op."""
    x = inp(ctx, node, 0)
    shape = ctx.type_of(x).shape
    if len(shape) != 4 or attrs.get("channels_last", 0) or attrs.get("ceil_mode", 0):
        raise UnsupportedOpError("com.microsoft.QLinearAveragePool", ctx.current, "only 2-D NCHW pooling in floor mode")
    kernel = tuple(attrs["kernel_shape"])
    strides = tuple(attrs.get("strides", (1, 1)))
    pads = _explicit_pads(ctx, node, attrs, shape[2:], kernel, strides, (1, 1))
    x_s, x_zp, logical = _qparams(ctx, node, 1, 2, x)
    y_s, y_zp, _ = _qparams(ctx, node, 3, 4, x)
    qmin, qmax, storage = QRANGE[logical]
    ctx.emit("QLinearAveragePool", [x], {"x_scale": float(x_s), "x_zero_point": int(x_zp), "y_scale": float(y_s),
                                         "y_zero_point": int(y_zp), "kernel_shape": kernel, "strides": strides,
                                         "pads": pads, "count_include_pad": bool(attrs.get("count_include_pad", 0)),
                                         "qmin": qmin, "qmax": qmax, "dtype": storage}, [node.output[0]])
    _record(ctx, "QLinearAveragePool", "com.microsoft.QLinearAveragePool", dtype=logical)


# ---------------------------------------------------------------------------- lookup tables
def _lookup(ctx, x: str, table: np.ndarray, out: str = "") -> str:
    """``table[x]`` with x's bit pattern as the index (int8 codes wrap like ONNX Gather)."""
    idx = ctx.emit("Cast", [x], {"to": "int32"})[0]
    return ctx.emit("Gather", [ctx.new_const(f"{ctx.current}_table", table), idx], {"axis": 0}, [out])[0]


def _qlinear_leaky_relu(ctx, node, attrs):
    x = inp(ctx, node, 0)
    x_s, x_zp, logical = _qparams(ctx, node, 1, 2, x)
    y_s, y_zp, _ = _qparams(ctx, node, 3, 4, x)
    alpha = _F32(attrs.get("alpha", 0.01))
    table = lookup_table(lambda v: np.where(v >= 0, v, v * alpha), x_s, x_zp, y_s, y_zp, logical)
    _lookup(ctx, x, table, node.output[0])
    _record(ctx, "Gather", "com.microsoft.QLinearLeakyRelu", dtype=logical, note="256-entry table")


def _qlinear_sigmoid(ctx, node, attrs):
    x = inp(ctx, node, 0)
    x_s, x_zp, logical = _qparams(ctx, node, 1, 2, x)
    y_s, y_zp, _ = _qparams(ctx, node, 3, 4, x)
    _lookup(ctx, x, lookup_table(mlas_logistic, x_s, x_zp, y_s, y_zp, logical), node.output[0])
    _record(ctx, "Gather", "com.microsoft.QLinearSigmoid", dtype=logical, note="256-entry table")


def _qlinear_concat(ctx, node, attrs):
    """com.microsoft.QLinearConcat(y_s, y_zp, (x_i, s_i, zp_i)...): inputs whose (s, zp) equal the
    output's are copied, the others requantized through a table, then Concat."""
    y_s, y_zp, logical = _qparams(ctx, node, 0, 1, inp(ctx, node, 2))
    parts = []
    for i in range(2, len(node.input), 3):
        x = inp(ctx, node, i)
        x_s, x_zp, _ = _qparams(ctx, node, i + 1, i + 2, x)
        if x_s == y_s and int(x_zp) == int(y_zp):
            parts.append(x)
        else:
            parts.append(_lookup(ctx, x, lookup_table(lambda v: v, x_s, x_zp, y_s, y_zp, logical)))
    rank = len(ctx.type_of(parts[0]).shape)
    ctx.emit("Concat", parts, {"axis": int(attrs["axis"]) % rank}, [node.output[0]])
    _record(ctx, "Concat", "com.microsoft.QLinearConcat", dtype=logical)


def _qlinear_softmax(ctx, node, attrs):
    """com.microsoft.QLinearSoftmax(x, x_s, x_zp, y_s, y_zp) on the last axis, uint8."""
    x = inp(ctx, node, 0)
    shape = ctx.type_of(x).shape
    axis = int(attrs.get("axis", -1 if int(attrs.get("opset", 13)) >= 13 else 1)) % len(shape)
    if axis != len(shape) - 1 or int(attrs.get("opset", 13)) < 13 or str(ctx.type_of(x).dtype) != "uint8":
        raise UnsupportedOpError("com.microsoft.QLinearSoftmax", ctx.current, "only uint8, opset >= 13, last axis")
    x_s, _, _ = _qparams(ctx, node, 1, 2, x)
    y_s, y_zp, _ = _qparams(ctx, node, 3, 4, x)
    table = ctx.new_const(f"{ctx.current}_exp_table", softmax_table(x_s, shape[-1]))
    ctx.emit("QLinearSoftmax", [x, table], {"y_multiplier": float(np.floor(_F32(1) / y_s)),
                                             "y_zero_point": int(y_zp)}, [node.output[0]])
    _record(ctx, "QLinearSoftmax", "com.microsoft.QLinearSoftmax", dtype="uint8")


QOP_CONVERTERS = {"ConvInteger": _conv_integer, "QLinearConv": _qlinear_conv, "QLinearMatMul": _qlinear_matmul}
QOP_DOMAIN_CONVERTERS = {
    ("com.microsoft", "QLinearAdd"): _qlinear_add,
    ("com.microsoft", "QLinearMul"): _qlinear_mul,
    ("com.microsoft", "QLinearGlobalAveragePool"): _qlinear_global_average_pool,
    ("com.microsoft", "QLinearAveragePool"): _qlinear_average_pool,
    ("com.microsoft", "QGemm"): _qgemm,
    ("com.microsoft", "QLinearLeakyRelu"): _qlinear_leaky_relu,
    ("com.microsoft", "QLinearSigmoid"): _qlinear_sigmoid,
    ("com.microsoft", "QLinearConcat"): _qlinear_concat,
    ("com.microsoft", "QLinearSoftmax"): _qlinear_softmax,
}
