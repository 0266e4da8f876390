"""The op set of qcompile's IR, and what each op means.

Semantics follow ONNX (numpy-style broadcasting) unless stated; every shape-like operand
that ONNX passes as a tensor is a static attribute here. The frontends produce only these
ops; the interpreter and every backend implement all of them (or raise UnsupportedOpError
naming the node).

Elementwise (inputs broadcast; outputs take the broadcast shape):
  binary  Add Sub Mul Div Pow Max Min Equal Less Greater LessOrEqual GreaterOrEqual And Or
  unary   Sqrt Erf Tanh Relu Sigmoid Exp Log Neg Abs Not Reciprocal IsNaN Identity
  Where(cond, x, y)
  Clip(x) attrs: min (float|None), max (float|None)
  Gelu(x) attrs: approximate ("none"|"tanh")
  Cast(x) attrs: to (numpy dtype name)

Normalisation / reductions:
  Softmax(x) attrs: axis
  LayerNorm(x, scale, bias?) attrs: axis (normalised axes are axis..last), epsilon
  ReduceMean ReduceSum ReduceMax ReduceMin ReduceL2 (x) attrs: axes (tuple), keepdims (bool)

Linear algebra:
  MatMul(a, b)                     numpy matmul semantics, both operands activations or one const
  Linear(x, weight, bias?)         y = x @ weight + bias; weight const [K, N], bias const [N]
  QLinear(x, qweight, scales, zeros?, bias?)
      weight-only quantized Linear. qweight: packed uint8 constant carrying a QuantSpec with
      logical_shape (K, N); scales float32 [N, G]; zeros float32 [N, G] (absent when
      symmetric) where G = K / group_size (group_size 0 -> G = 1). attrs: bits, group_size,
      symmetric. Dequantized weight: W[k, n] = (q[n, k] - zero[n, k // gs]) * scale[n, k // gs].
  QGather(qtable, scales, zeros?, indices)
      embedding lookup from a row-quantized table (logical shape [V, D], groups along D);
      output = dequant(table)[indices]. Packing: qtable uint8 [V, ceil(D*bits/8)] and
      scales/zeros [V, G], i.e. quant.pack_codes with rows = V and the packed axis = D.

Quantization (numerics of the ONNX specification; see qcompile.interpreter_quant):
  QuantizeLinear(x, scale, zero_point) attrs: qmin, qmax, dtype (storage: int8 uint8 int16
      uint16 int32; int4/uint4 are int8/uint8 storage with qmin/qmax -8..7 / 0..15).
      scale f32 / zero_point (dtype) broadcast to x (per-axis and blocked parameters are
      expanded by the frontend). y = clip(round_half_even(x / scale) + zero_point, qmin, qmax)
  DequantizeLinear(x, scale, zero_point) -> float32: (float(x) - float(zero_point)) * scale
  DynamicQuantizeLinear(x) -> (y uint8, scale f32 [], zero_point uint8 []) per ONNX
  MatMulInteger(a, b, a_zp?, b_zp?) -> int32: (a - a_zp) @ (b - b_zp), int32 accumulation;
      a_zp per tensor, b_zp per tensor or per column (b 2-D)
  ConvInteger(x, w, x_zp?, w_zp?) -> int32: ONNX ConvInteger, conv(x - x_zp, w - w_zp) with int32
      accumulation, padding holds the real 0; x_zp per tensor, w_zp per tensor or [Cout].
      attrs: strides, pads, dilations, group (reference: qcompile.interpreter_qoperator)
  QLinearAdd(a, b) -> dtype: onnxruntime's com.microsoft.QLinearAdd on raw codes, in float32:
      y = clip(rne(fma(a, a_ratio, fma(b, b_ratio, fixed))), qmin, qmax); an operand with one
      element is folded into the constant first (fixed + v * ratio, unfused).
      attrs: a_ratio, b_ratio, fixed (float32 values), qmin, qmax, dtype
  QLinearMul(a, b) -> dtype: com.microsoft.QLinearMul: p = (a - a_zero_point) * (b - b_zero_point)
      (int32), y = clip(rne(float32(p) * ratio + c_zero_point), qmin, qmax), multiply and add each
      rounded to float32. attrs: a_zero_point, b_zero_point (ints), ratio, c_zero_point (floats),
      qmin, qmax, dtype
  QLinearAveragePool(x) -> dtype: com.microsoft.QLinearAveragePool (2-D, NCHW, floor mode):
      float32 sum of x_scale * (x - x_zero_point) over the window in h-major order, / count (the
      elements inside the input, or the whole window with count_include_pad), then
      clip(rne(y / y_scale + y_zero_point), qmin, qmax). attrs: x_scale, x_zero_point, y_scale,
      y_zero_point, kernel_shape, strides, pads, count_include_pad, qmin, qmax, dtype
  QLinearSoftmax(x uint8, table f32 [256]) -> uint8: com.microsoft.QLinearSoftmax on the last
      axis: e = table[x - max(x) + 255], s = float32 sum of e in index order,
      y = min(rne(e * y_multiplier / s) + y_zero_point, 255) (a NaN quotient: 0).
      attrs: y_multiplier, y_zero_point

Activation quantization, W8A8 (reference: qcompile.interpreter_int8). Codes are uint8 with
zero point 128: u = q + 128, q in [-127, 127]; rounding is half to even.
  QuantizeAct(x[..., K]) -> (u uint8[..., K], scale float32[..., 1])
      attrs: mode ("dynamic" | "static"), scale (float; static only), bits (8 | 4, default 8):
      qmax = 2**(bits - 1) - 1 (127 or 7).
      dynamic (per row): amax = max(max_K |x|, 1e-8); scale = amax / qmax;
          u = clip(rne(x * (qmax / amax)), -qmax, qmax) + 128 (all float32).
      static (per tensor): scale output filled with attr scale;
          u = clip(rne(x * float32(1 / scale)), -qmax, qmax) + 128.
  Int8Linear(u uint8[..., K], xscale f32[..., 1], qweight int8 const [K, N], wscale f32 [N], bias f32 [N]?)
      y = float32(sum_k (u - 128) * qweight[k, n]) * (xscale * wscale[n]) + bias[n];
      exact integer accumulation (int32). attrs: wbits (qweight lies in +-(2**(wbits-1) - 1)).

Integer-only (inserted by passes.integerize; reference: qcompile.interpreter_integer). Codes are
uint8 with zero point 128 (q = u - 128); accumulators are int32; every value is an exact integer.
A dyadic rescale by (m int32, s int32) is fpm(x, m, s) = int32((int64(x) << max(s, 0)) * m
+ 2**(t - 1)) >> t) with t = max(-s, 0) + 31, i.e. x * m * 2**(s - 31) rounded half up, exactly
TVM's tirx.q_multiply_shift_per_axis with q = 31 (int32 results wrap).
  IntLinear(u uint8[..., K], qweight int8 const [K, N], bias int32 [N]?, row_mult int32 [..., 1]?)
      -> int32[..., N]: acc = (sum_k (u - 128) * qweight[k, n]) * row_mult[row] + bias[n] (int32
      wrap; row_mult: the 2**r of IntRowQuantize codes). attrs: wbits.
  IntConv(u uint8 NCHW, w int8 const [Cout, Cin/group, kh, kw], bias int32 [Cout]?) -> int32 NCHW
      Conv semantics on q = u - 128, padding with q = 0 (code 128). attrs: strides, pads,
      dilations, group.
  Requantize(x int32 | uint8 codes, multiplier int32 [C], shift int32 [C]) -> out_dtype
      attrs: axis (the axis C runs along; unused when C == 1), out_dtype ("int32" | "uint8"),
      qmin, qmax (uint8 only; default -127, 127). v = x (int32) or x - 128 (codes);
      r = fpm(v, multiplier[c], shift[c]); int32: r; uint8: clip(r, qmin, qmax) + 128.
  Transformer ops (reference: qcompile.interpreter_integer_nn, whose docstring gives the exact
  integer sequence; int64 intermediates, floor divisions, round-half-up shifts):
  IntMatMul(a, b) -> int32: (a - a_zero) @ (b - b_zero), numpy matmul broadcasting; attrs
      a_zero, b_zero (128 for codes, 0 for int32 operands).
  IntLayerNorm(x int32[..., N], gamma int64 [N], beta int64 [N]) -> int32 over the last axis;
      attrs pre_shift, out_shift. c = round((x - mean) / 2**pre_shift), std = isqrt(sum c**2 *
      2**16 // N), n = (c * (2**46 // std)) >> 16, y = round(n * gamma / 2**out_shift) + beta.
  IntSoftmax(x int32, table int32 [T]) -> int32 probabilities at scale 2**-15 over the last
      axis; attrs mult, shift (dyadic: max - x -> table index).
  Lut(x int32 | uint8, table [T]) -> table dtype: table[clip(x + offset, 0, T - 1)]; attr offset.
  IntDiv(a int32, b int32) -> int32: round_half_up(a * num / (max(b, 1) * den)); attrs num, den.
  IntReduceL2(x int32) -> int32: isqrt(sum x**2) over axes; attrs axes, keepdims.
  IntRowQuantize(x int32 [..., K]) -> (codes uint8 [..., K], mult int32 [..., 1]): dynamic
      power-of-two codes per row; attr max_shift. a = max |x| over the row, r = clip(bit_length(a)
      - 7, 0, max_shift), mult = 2**r, codes = clip((x + mult / 2) // mult, -127, 127) + 128.
  The integer graph also uses Clip, MaxPool, ReduceSum, Add, Sub, Mul, Where, Cast and data movement on
  integer dtypes (their generic semantics, exact). Its float boundary: QuantizeAct (static) of a
  graph input, DequantizeLinear of a graph output.

Rotation (inserted by passes.hadamard_rotation; see qcompile.hadamard):
  Hadamard(x) attrs: size, axis (-1 only)
      y = x @ kron(I, H_size) along the last axis, H_size = qcompile.hadamard.hadamard(size)
      the orthogonal (normalized) Hadamard matrix; size divides the last dimension.

Data movement:
  Reshape(x) attrs: shape (tuple of ints, fully resolved, no 0/-1)
  Transpose(x) attrs: perm
  Gather(data, indices) attrs: axis (negative indices wrap, as in ONNX)
  Slice(x) attrs: starts, ends, axes, steps (tuples, already clamped to the shape)
  Concat(*xs) attrs: axis
  Expand(x) attrs: shape (the output shape)

Convolution networks (NCHW):
  Conv(x, w, b?) attrs: strides, pads (ONNX order), dilations, group
  MaxPool AveragePool (x) attrs: kernel_shape, strides, pads
  GlobalAveragePool(x)
"""

__all__ = ["ELEMENTWISE_BINARY", "ELEMENTWISE_UNARY", "REDUCTIONS", "ALL_OPS", "is_known_op"]

ELEMENTWISE_BINARY = frozenset(
    "Add Sub Mul Div Pow Max Min Equal Less Greater LessOrEqual GreaterOrEqual And Or".split()
)
ELEMENTWISE_UNARY = frozenset(
    "Sqrt Erf Tanh Relu Sigmoid Exp Log Neg Abs Not Reciprocal IsNaN Identity".split()
)
REDUCTIONS = frozenset("ReduceMean ReduceSum ReduceMax ReduceMin ReduceL2".split())
OTHER_OPS = frozenset(
    """Where Clip Gelu Hadamard Cast Softmax LayerNorm MatMul Linear QLinear QGather Reshape Transpose
    Gather Slice Concat Expand Conv MaxPool AveragePool GlobalAveragePool
    QuantizeLinear DequantizeLinear DynamicQuantizeLinear MatMulInteger
    QuantizeAct Int8Linear IntLinear IntConv Requantize ConvInteger QLinearAdd QLinearMul QLinearAveragePool
    QLinearSoftmax
    IntMatMul IntLayerNorm IntSoftmax Lut IntDiv IntReduceL2 IntRowQuantize""".split()
)
ALL_OPS = ELEMENTWISE_BINARY | ELEMENTWISE_UNARY | REDUCTIONS | OTHER_OPS


def is_known_op(op: str) -> bool:
    return op in ALL_OPS
