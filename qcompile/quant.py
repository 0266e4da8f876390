"""Integer quantization arithmetic shared by passes, interpreter and backends.

Packing ``n_major_lsb_first`` (the only layout so far): a logical weight W[K, N] quantized
to unsigned codes q in [0, 2**bits) is stored as uint8 ``packed[N, ceil(K * bits / 8)]``:
row n holds the codes q[0..K-1, n] as a little-endian bit stream (code k occupies bits
k*bits .. k*bits+bits-1, least significant bit first). For 2/4/8 bits a byte holds 4/2/1
whole codes; 3-bit codes may straddle bytes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_codes", "unpack_codes", "dequantize_weight"]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes[N, K] (uint values < 2**bits) along K into uint8[N, ceil(K*bits/8)]."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.max(initial=0) >= (1 << bits):
        raise ValueError(f"code out of range for {bits} bits")
    n, k = codes.shape
    bit_planes = ((codes[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(n, k * bits)
    return np.packbits(bit_planes, axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8[N, ceil(K*bits/8)] -> uint8 codes[N, K]."""
    n = packed.shape[0]
    if 8 % bits == 0:  # whole codes per byte (2, 4, 8 bits): shift and mask, no bit planes
        codes = (packed[:, :, None] >> np.arange(0, 8, bits, dtype=np.uint8)) & np.uint8((1 << bits) - 1)
        return np.ascontiguousarray(codes.reshape(n, -1)[:, :k])
    bit_stream = np.unpackbits(packed, axis=1, bitorder="little")[:, : k * bits]
    planes = bit_stream.reshape(n, k, bits).astype(np.uint8)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)


def dequantize_weight(packed, scales, zeros, bits: int, group_size: int, k: int) -> np.ndarray:
    """Packed codes + per-group scales/zeros -> float32 W[K, N] (the QLinear semantics)."""
    codes = unpack_codes(packed, bits, k).astype(np.float32)  # [N, K]
    gs = group_size or k
    group_of_k = np.arange(k) // gs
    zero = zeros[:, group_of_k] if zeros is not None else np.float32(1 << (bits - 1))
    return ((codes - zero) * scales[:, group_of_k]).T.astype(np.float32)
