"""ONNX -> IR converters for pre-quantized models (QDQ, QOperator, com.microsoft.MatMulNBits).

The recipe found in the model is kept: quantized weights become qcompile's own quantized
IR (``QLinear`` with a ``QuantSpec`` of ``method="imported"``), never expanded silently into
float math, and every imported layer gets a ``graph.metadata["quant_recipe"]`` entry.
Numerics follow the ONNX specification (and onnxruntime's contrib op documentation)
exactly; the dequantized weight of an imported layer is bit-identical to onnxruntime's.

Rewrites (each refuses with :class:`UnsupportedOpError` outside the stated case):

1. ``MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?)`` (bits 2/4/8, any block size)
   -> ``QLinear``: ORT's blob layout [N, blocks, blob] is repacked to ``n_major_lsb_first``;
   uint8 zero points are unpacked (LSB first per row), float zero points are used as is,
   absent ones mean ``2**(bits-1)`` (symmetric). A partial last block (K % block_size != 0)
   cannot be a QLinear group: the exactly dequantized float weight becomes a ``Linear``
   (recipe entry says so). A ``g_idx`` other than ``k // block_size`` is refused.
   ``accuracy_level`` is recorded, not emulated: qcompile computes in float32 (ORT's level
   0/1 numerics); ORT's level 4 quantizes A to int8 and differs from both.
2. ``DequantizeLinear`` with all-constant inputs is evaluated at import time (exact).
   When its result then feeds ``MatMul`` as the 2-D right operand and the quantization is
   per tensor, per output column (axis 1) or blocked along K (axis 0), the MatMul becomes a
   ``QLinear`` with 8/4-bit codes (signed codes offset to unsigned, zero point likewise):
   the dequantized weight is bit-identical.
3. ``QuantizeLinear`` / ``DequantizeLinear`` on run-time values -> IR ops of the same name
   (after ``load_onnx`` has fused DQ -> MatMul/Add/Mul/Softmax -> Q groups into onnxruntime's
   QOperator kernels, as its default session runs them: :mod:`.onnx_qdq_fusion`);
   per-axis and blocked scales/zero points are expanded at import to arrays that broadcast
   against the input (see :mod:`qcompile.ops`). int4/uint4 use int8/uint8 storage with
   qmin/qmax saturation bounds.
4. ``DynamicQuantizeLinear`` -> the IR op (three outputs); ``MatMulInteger`` -> the IR op
   with int32 accumulation. (QLinearMatMul and the other QOperator ops: :mod:`.onnx_qoperator`.)
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError, UnsupportedOpError
from ..ir import QuantSpec
from ..quant import pack_codes, unpack_codes
from .onnx_ops import inp, need_const, norm_axis

__all__ = ["QUANT_CONVERTERS", "QUANT_DOMAIN_CONVERTERS", "QRANGE", "expand_qparam"]

# storage dtype name -> (qmin, qmax, storage numpy dtype)
QRANGE = {
    "int8": (-128, 127, "int8"), "uint8": (0, 255, "uint8"),
    "int16": (-32768, 32767, "int16"), "uint16": (0, 65535, "uint16"),
    "int4": (-8, 7, "int8"), "uint4": (0, 15, "uint8"), "int32": (-(2**31), 2**31 - 1, "int32"),
}
_ONNX_TYPE = {3: "int8", 2: "uint8", 5: "int16", 4: "uint16", 22: "int4", 21: "uint4", 6: "int32"}


# ---------------------------------------------------------------------------- helpers
def _recipe(ctx, entry: dict) -> None:
    ctx.graph.metadata.setdefault("quant_recipe", []).append({"method": "imported", **entry})


def _dq_weights(ctx) -> dict:
    """Side table of the Importer: IR name of a folded DequantizeLinear -> its integer form."""
    table = getattr(ctx, "_qcompile_dq_weights", None)
    if table is None:
        table = ctx._qcompile_dq_weights = {}
    return table


def _logical_dtype(array: np.ndarray) -> str:
    """Name of a (possibly ml_dtypes int4/uint4) integer array's ONNX element type."""
    name = str(array.dtype)
    return name if name in QRANGE else {"int4": "int4", "uint4": "uint4"}.get(name, name)


def _as_storage(array: np.ndarray, ctx=None, node=None) -> tuple[np.ndarray, str]:
    """int4/uint4 arrays (ml_dtypes) -> int8/uint8 storage; returns (array, logical dtype name)."""
    logical = _logical_dtype(array)
    if logical not in QRANGE:
        op = node.op_type if node is not None else "QuantizeLinear"
        raise UnsupportedOpError(op, getattr(ctx, "current", ""), f"quantized type {logical} (float8 and others are not supported)")
    return np.asarray(array).astype(QRANGE[logical][2]), logical


def expand_qparam(param: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int) -> np.ndarray:
    """A scale/zero point (scalar, per-axis [C] or blocked) as an array broadcasting to ``shape``."""
    param = np.asarray(param)
    if param.size == 1 and not block_size:
        return param.reshape(())
    rank = len(shape)
    if not block_size:
        view = [1] * rank
        view[axis] = shape[axis]
        return param.reshape(view)
    full = np.repeat(param, block_size, axis=axis)
    index = [slice(None)] * rank
    index[axis] = slice(0, shape[axis])
    return np.ascontiguousarray(full[tuple(index)])


def _qparams(ctx, node, attrs, shape):
    """(axis|None, block_size, scale, zero point|None) of a Q/DQ node, validated."""
    scale = need_const(ctx, node, 1, "scale")
    zp = need_const(ctx, node, 2, "zero point")
    block = int(attrs.get("block_size", 0))
    axis = None
    if scale.size > 1 or block:
        axis = norm_axis(ctx, node, int(attrs.get("axis", 1)), len(shape))
        want = (shape[axis],) if not block else tuple(
            math.ceil(d / block) if i == axis else d for i, d in enumerate(shape))
        got = tuple(scale.shape) if block else (scale.size,)
        if got != want:
            raise ShapeError(f"node '{ctx.current}' ({node.op_type}): scale shape {scale.shape} does not fit "
                             f"input {shape} (axis {axis}, block_size {block})")
    if zp is not None and zp.size != scale.size:
        raise ShapeError(f"node '{ctx.current}' ({node.op_type}): zero point shape {zp.shape} != scale shape {scale.shape}")
    return axis, block, scale, zp


# ---------------------------------------------------------------------------- Q / DQ
def _quantize_linear(ctx, node, attrs):
    x = inp(ctx, node, 0)
    shape = ctx.type_of(x).shape
    axis, block, scale, zp = _qparams(ctx, node, attrs, shape)
    if zp is not None:
        zp, logical = _as_storage(zp, ctx, node)
    else:
        logical = _ONNX_TYPE.get(int(attrs.get("output_dtype", 2)))
        if logical is None:
            raise UnsupportedOpError(node.op_type, ctx.current, f"output_dtype {attrs.get('output_dtype')}")
        zp = np.zeros(scale.shape, dtype=QRANGE[logical][2])
    qmin, qmax, storage = QRANGE[logical]
    s = ctx.new_const(f"{ctx.current}_scale", expand_qparam(scale.astype(np.float32), shape, axis, block))
    z = ctx.new_const(f"{ctx.current}_zero_point", expand_qparam(zp, shape, axis, block))
    ctx.emit("QuantizeLinear", [x, s, z], {"qmin": qmin, "qmax": qmax, "dtype": storage}, [node.output[0]])
    if ctx.const(ctx.ir(node.output[0])) is None:
        _recipe(ctx, {"node": ctx.graph.nodes[-1].name, "op": "QuantizeLinear", "dtype": logical,
                      "granularity": _granularity(axis, block), "bits": int(math.log2(qmax - qmin + 1))})


def _granularity(axis, block) -> str:
    return "per_tensor" if axis is None else (f"per_axis({axis})" if not block else f"blocked(axis={axis}, {block})")


def _dequantize_linear(ctx, node, attrs):
    x = inp(ctx, node, 0)
    shape = ctx.type_of(x).shape
    axis, block, scale, zp = _qparams(ctx, node, attrs, shape)
    xc = ctx.const(x)
    if xc is not None and _logical_dtype(xc) in ("int4", "uint4"):
        xc, _ = _as_storage(xc, ctx, node)
        x = ctx.new_const(f"{ctx.current}_x", xc)
    dtype = str(ctx.type_of(x).dtype)
    zp = np.zeros(scale.shape, dtype=dtype) if zp is None else _as_storage(zp, ctx, node)[0]
    s = ctx.new_const(f"{ctx.current}_scale", expand_qparam(scale.astype(np.float32), shape, axis, block))
    z = ctx.new_const(f"{ctx.current}_zero_point", expand_qparam(zp, shape, axis, block))
    out = ctx.emit("DequantizeLinear", [x, s, z], {}, [node.output[0]])[0]
    if xc is not None and len(shape) == 2 and dtype in ("int8", "uint8"):
        logical = _logical_dtype(ctx.const(inp(ctx, node, 0)))
        _dq_weights(ctx)[out] = (xc, scale.astype(np.float32), zp, axis, block, logical)
    elif xc is None:
        _recipe(ctx, {"node": ctx.graph.nodes[-1].name, "op": "DequantizeLinear", "dtype": dtype,
                      "granularity": _granularity(axis, block)})


def _matmul_or_qlinear(ctx, node, attrs):
    """MatMul whose right operand is a folded DequantizeLinear weight -> QLinear (case 2)."""
    from .onnx_nn import NN_CONVERTERS

    a, b = inp(ctx, node, 0), inp(ctx, node, 1)
    info = _dq_weights(ctx).get(b)
    if info is None or ctx.const(a) is not None or len(ctx.type_of(a).shape) < 2 or ctx.type_of(a).dtype != "float32":
        return NN_CONVERTERS["MatMul"](ctx, node, attrs)
    packed = _dq_to_qlinear(*info)
    if packed is None:
        return NN_CONVERTERS["MatMul"](ctx, node, attrs)
    codes, scales, zeros, bits, group, logical, granularity = packed
    k, n = info[0].shape
    _emit_qlinear(ctx, node.output[0], a, codes, scales, zeros, None, bits, group)
    _recipe(ctx, {"node": ctx.graph.nodes[-1].name, "op": "QLinear", "shape": [k, n], "bits": bits,
                  "group_size": group, "symmetric": False, "dtype": logical, "granularity": granularity,
                  "source": "DequantizeLinear", "weight_bytes_fp32": 4 * k * n})


def _dq_to_qlinear(w, scale, zp, axis, block, logical):
    """Integer weight [K, N] + qparams -> (codes[N, K] unsigned, scales[N, G], zeros[N, G], ...)."""
    k, n = w.shape
    bits = 4 if logical in ("int4", "uint4") else 8
    offset = (1 << (bits - 1)) if logical in ("int8", "int4") else 0
    codes = (w.astype(np.int32) + offset).T
    zp32 = zp.astype(np.float32) + np.float32(offset)
    if axis is None:
        return codes, np.full((n, 1), scale.reshape(()), np.float32), np.full((n, 1), zp32.reshape(())), bits, 0, logical, "per_tensor"
    if axis == 1 and not block:
        return codes, scale.reshape(n, 1), zp32.reshape(n, 1), bits, 0, logical, "per_axis(1)"
    if axis == 0 and block and k % block == 0:
        return codes, np.ascontiguousarray(scale.T), np.ascontiguousarray(zp32.T), bits, block, logical, f"blocked(axis=0, {block})"
    return None


def _emit_qlinear(ctx, out, a, codes, scales, zeros, bias, bits, group, method="imported") -> None:
    """Add the packed constant (with its QuantSpec) and emit QLinear(a, ...) -> ONNX output ``out``."""
    n, k = codes.shape
    spec = QuantSpec(bits=bits, symmetric=zeros is None, axis=0, group_size=group, logical_shape=(k, n), method=method)
    base = ctx.current or "qlinear"
    qname = ctx.graph.add_constant(ctx.fresh(f"{base}.qweight"), pack_codes(codes, bits), spec)
    ins = [a, qname, ctx.new_const(f"{base}.scales", np.ascontiguousarray(scales, np.float32)),
           "" if zeros is None else ctx.new_const(f"{base}.zeros", np.ascontiguousarray(zeros, np.float32)),
           "" if bias is None else bias]
    while ins and ins[-1] == "":
        ins.pop()
    ctx.emit("QLinear", ins, {"bits": bits, "group_size": group, "symmetric": zeros is None}, [out])


# ---------------------------------------------------------------------------- MatMulNBits
def _matmul_nbits(ctx, node, attrs):
    k, n = int(attrs["K"]), int(attrs["N"])
    bits, block = int(attrs.get("bits", 4)), int(attrs["block_size"])
    if bits not in (2, 4, 8):
        raise UnsupportedOpError("com.microsoft.MatMulNBits", ctx.current, f"bits={bits} (2, 4 and 8 are supported)")
    a = inp(ctx, node, 0)
    if ctx.type_of(a).dtype != "float32" or ctx.type_of(a).shape[-1] != k:
        raise UnsupportedOpError("com.microsoft.MatMulNBits", ctx.current, f"A must be float32 [..., {k}]")
    blocks = math.ceil(k / block)
    b = need_const(ctx, node, 1, "B")
    codes = unpack_codes(np.ascontiguousarray(b, np.uint8).reshape(n, -1), bits, blocks * block)[:, :k]
    scales = need_const(ctx, node, 2, "scales").astype(np.float32).reshape(n, blocks)
    zeros = _nbits_zeros(need_const(ctx, node, 3, "zero_points"), n, blocks, bits)
    g_idx = need_const(ctx, node, 4, "g_idx") if len(node.input) > 4 else None
    if g_idx is not None and not np.array_equal(g_idx.reshape(-1), np.arange(k) // block):
        raise UnsupportedOpError("com.microsoft.MatMulNBits", ctx.current, "g_idx other than k // block_size")
    bias = inp(ctx, node, 5) if len(node.input) > 5 else ""
    entry = {"op": "QLinear", "shape": [k, n], "bits": bits, "group_size": block, "symmetric": zeros is None,
             "source": "com.microsoft.MatMulNBits", "zero_points": "absent" if zeros is None else "present",
             "accuracy_level": int(attrs.get("accuracy_level", 0)),
             "weight_bytes_fp32": 4 * k * n, "weight_bytes_packed": int(b.nbytes + scales.nbytes + (0 if zeros is None else zeros.nbytes))}
    if k % block == 0:
        _emit_qlinear(ctx, node.output[0], a, codes, scales, zeros, bias or None, bits, block)
    else:
        entry.update(op="Linear", note="partial last block: weight dequantized exactly to float")
        weight = _dequant_nbits(codes, scales, zeros, bits, block)
        ins = [a, ctx.new_const(f"{ctx.current}.weight", weight)] + ([bias] if bias else [])
        ctx.emit("Linear", ins, {}, [node.output[0]])
    _recipe(ctx, {"node": ctx.graph.nodes[-1].name, **entry})


def _nbits_zeros(zp, n, blocks, bits):
    if zp is None:
        return None
    if np.issubdtype(zp.dtype, np.floating):
        return zp.astype(np.float32).reshape(n, blocks)
    return unpack_codes(np.ascontiguousarray(zp, np.uint8).reshape(n, -1), bits, blocks).astype(np.float32)


def _dequant_nbits(codes, scales, zeros, bits, block) -> np.ndarray:
    """ORT's dequantization: W[k, n] = (q[n, k] - zp[n, k // bs]) * scale[n, k // bs], float32."""
    group = np.arange(codes.shape[1]) // block
    zero = zeros[:, group] if zeros is not None else np.float32(1 << (bits - 1))
    return np.ascontiguousarray(((codes.astype(np.float32) - zero) * scales[:, group]).T, np.float32)


# ---------------------------------------------------------------------------- integer ops
def _dynamic_quantize_linear(ctx, node, attrs):
    outs = list(node.output) + [""] * (3 - len(node.output))
    ctx.emit("DynamicQuantizeLinear", [inp(ctx, node, 0)], {}, outs, n_outputs=3)
    _recipe(ctx, {"node": ctx.graph.nodes[-1].name, "op": "DynamicQuantizeLinear", "dtype": "uint8",
                  "granularity": "per_tensor (dynamic)", "bits": 8})


def _matmul_integer(ctx, node, attrs):
    a, b = inp(ctx, node, 0), inp(ctx, node, 1)
    a_zp, b_zp = inp(ctx, node, 2), inp(ctx, node, 3)
    if a_zp and ctx.type_of(a_zp).size != 1:
        raise UnsupportedOpError(node.op_type, ctx.current, "a_zero_point must be per tensor")
    if b_zp:
        bshape, zshape = ctx.type_of(b).shape, ctx.type_of(b_zp).shape
        if math.prod(zshape) not in (1, bshape[-1]) or len(bshape) != 2:
            raise UnsupportedOpError(node.op_type, ctx.current, "b_zero_point must be per tensor or per column of a 2-D B")
    ins = [a, b, a_zp, b_zp]
    while ins[-1] == "":
        ins.pop()
    ctx.emit("MatMulInteger", ins, {}, [node.output[0]])
    _recipe(ctx, {"node": ctx.graph.nodes[-1].name, "op": "MatMulInteger", "shape": list(ctx.type_of(b).shape),
                  "bits": 8, "dtype": f"{ctx.type_of(a).dtype} x {ctx.type_of(b).dtype} -> int32"})


QUANT_CONVERTERS = {
    "QuantizeLinear": _quantize_linear, "DequantizeLinear": _dequantize_linear,
    "MatMul": _matmul_or_qlinear, "DynamicQuantizeLinear": _dynamic_quantize_linear,
    "MatMulInteger": _matmul_integer,
}
QUANT_DOMAIN_CONVERTERS = {("com.microsoft", "MatMulNBits"): _matmul_nbits}
