"""Q3_K: super-blocks of 256 values in 16 sub-blocks of 16; x = d * (s_j - 32) * (q - 4), q in 0..7.

The 6-bit sub-block scales s_j: bytes 0-7 of `scales` hold the low nibbles of s_0..s_7 (low) and s_8..s_15
(high); byte 8 + k holds the top two bits of s_k, s_4+k, s_8+k, s_12+k at bits 0, 2, 4, 6. The codes' low two
bits are packed as in Q2_K; bit k of hmask[l] is the third bit of value 32k + l.
Quantizer: quantize_row_q3_K_ref (ggml-quants.c): make_q3_quants per sub-block, the scales rounded onto
-32..31 steps of the largest, codes recomputed against the stored scales.
"""

# Q3_K: 256 values in 110 bytes = hmask:32 qs:64 scales:12 d:2

import numpy as np
from gguf import GGMLQuantizationType

from .common import (
    QK_K,
    BlockFormat,
    f16_bytes,
    f16_field,
    f16_round,
    first_absmax,
    nearest_int,
    pack_bits,
    unpack_bits,
)
from .k_search import make_q3_quants
from .q2_k import pack_crumbs, unpack_crumbs

F32 = np.float32
BIT_SHIFTS = tuple(range(8))


def pack_scales(s: np.ndarray) -> np.ndarray:
    """6-bit scales uint8 (n, 16) -> the 12-byte field (n, 12)."""
    lo = (s[:, :8] & np.uint8(0x0F)) | ((s[:, 8:] & np.uint8(0x0F)) << np.uint8(4))
    hi = pack_bits((s >> np.uint8(4)).reshape(-1, 4, 4), (0, 2, 4, 6))
    return np.concatenate([lo, hi], axis=1)


def unpack_scales(field: np.ndarray) -> np.ndarray:
    """The 12-byte field uint8 (n, 12) -> 6-bit scales uint8 (n, 16)."""
    lo = unpack_bits(field[:, :8], (0, 4), 0x0F).reshape(-1, 16)
    hi = unpack_bits(field[:, 8:], (0, 2, 4, 6), 3).reshape(-1, 16)
    return lo | (hi << np.uint8(4))


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 110)."""
    n = x.shape[0]
    scales, L = make_q3_quants(x.reshape(n * 16, 16), 4)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)

    _, max_scale = first_absmax(scales)
    has_scale = max_scale != 0
    with np.errstate(divide="ignore"):
        iscale = np.where(has_scale, F32(-32) / max_scale, F32(0))
        l = nearest_int(iscale[:, None] * scales).astype(np.int8)  # C stores into an int8_t first
        d = np.where(has_scale, F32(1) / iscale, F32(0))
    s = np.where(has_scale[:, None], np.clip(l, -32, 31) + 32, 0).astype(np.uint8)

    sub_d = f16_round(d)[:, None] * (s.astype(np.int8) - np.int8(32)).astype(F32)
    with np.errstate(all="ignore"):
        q = nearest_int(x.reshape(n, 16, 16) / sub_d[:, :, None])
    L = np.where(sub_d[:, :, None] != 0, np.clip(q, -4, 3) + 4, L).astype(np.uint8).reshape(n, QK_K)

    hmask = pack_bits((L >> np.uint8(2)).reshape(n, 8, 32), BIT_SHIFTS)
    qs = pack_crumbs(L & np.uint8(3))
    return np.concatenate([hmask, qs, pack_scales(s), f16_bytes(d)], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 110) -> float32 (n, 256)."""
    d = f16_field(b[:, 108:110])
    s = unpack_scales(b[:, 96:108]).astype(np.int8) - np.int8(32)
    sub_d = (d * s.astype(F32))[:, :, None]  # (n, 16, 1)
    hi = unpack_bits(b[:, :32], BIT_SHIFTS, 1).reshape(-1, QK_K)
    q = (unpack_crumbs(b[:, 32:96]) | (hi << np.uint8(2))).astype(np.int8) - np.int8(4)
    return (sub_d * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, QK_K)


FORMAT = BlockFormat(
    "q3_k",
    GGMLQuantizationType.Q3_K,
    QK_K,
    110,
    "hmask:32 qs:64 scales:12 d:2",
    quantize_blocks,
    dequantize_blocks,
)
