"""Q2_K: super-blocks of 256 values in 16 sub-blocks of 16; x = d * sc_j * q - dmin * m_j, q in 0..3.

Byte j of scales holds sub-block j's 4-bit scale (low nibble) and 4-bit min (high nibble), on float16 d, dmin.
Quantizer: quantize_row_q2_K_ref (ggml-quants.c): make_qkx2_quants per sub-block with weights |x| and the
absolute-error criterion, scales and mins rounded onto 15 steps of their maxima, codes recomputed against
the stored values. qs byte l of half h (h = 0, 1) holds values 128h + 32k + l in bits 2k..2k+1.
"""

# Q2_K: 256 values in 84 bytes = scales:16 qs:64 d:2 dmin:2

import numpy as np
from gguf import GGMLQuantizationType

from .common import QK_K, BlockFormat, f16_bytes, f16_field, f16_round, nearest_int, pack_bits, unpack_bits
from .k_search import make_qkx2_quants

F32 = np.float32
CRUMB_SHIFTS = (0, 2, 4, 6)


def pack_crumbs(L: np.ndarray) -> np.ndarray:
    """2-bit codes uint8 (n, 256) -> qs (n, 64), the order Q2_K and Q3_K share."""
    return pack_bits(L.reshape(-1, 4, 32), CRUMB_SHIFTS).reshape(-1, 64)


def unpack_crumbs(qs: np.ndarray) -> np.ndarray:
    """qs uint8 (n, 64) -> 2-bit codes uint8 (n, 256)."""
    return unpack_bits(qs.reshape(-1, 32), CRUMB_SHIFTS, 3).reshape(-1, QK_K)


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 84)."""
    n = x.shape[0]
    xs = x.reshape(n * 16, 16)
    scales, mins, L = make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, L = scales.reshape(n, 16), mins.reshape(n, 16), L.reshape(n, 16, 16)

    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        ls = nearest_int(np.where(max_scale > 0, F32(15) / max_scale, F32(0))[:, None] * scales)
        lm = nearest_int(np.where(max_min > 0, F32(15) / max_min, F32(0))[:, None] * mins)
    ls = np.where(max_scale[:, None] > 0, ls, 0)
    lm = np.where(max_min[:, None] > 0, lm, 0)
    sc = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)  # uint8 stores, as in C
    d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
    dmin = np.where(max_min > 0, max_min / F32(15), F32(0))

    sub_d = f16_round(d)[:, None] * (sc & np.uint8(0x0F)).astype(F32)
    sub_m = f16_round(dmin)[:, None] * (sc >> np.uint8(4)).astype(F32)
    with np.errstate(all="ignore"):
        q = nearest_int((x.reshape(n, 16, 16) + sub_m[:, :, None]) / sub_d[:, :, None])
    L = np.where(sub_d[:, :, None] != 0, np.clip(q, 0, 3), L).astype(np.uint8)
    return np.concatenate([sc, pack_crumbs(L.reshape(n, QK_K)), f16_bytes(d), f16_bytes(dmin)], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 84) -> float32 (n, 256)."""
    sc = b[:, :16]
    d, dmin = f16_field(b[:, 80:82]), f16_field(b[:, 82:84])
    sub_d = (d * (sc & np.uint8(0x0F)).astype(F32))[:, :, None]  # (n, 16, 1)
    sub_m = (dmin * (sc >> np.uint8(4)).astype(F32))[:, :, None]
    q = unpack_crumbs(b[:, 16:80]).reshape(-1, 16, 16).astype(F32)
    return (sub_d * q - sub_m).reshape(-1, QK_K)


FORMAT = BlockFormat(
    "q2_k",
    GGMLQuantizationType.Q2_K,
    QK_K,
    84,
    "scales:16 qs:64 d:2 dmin:2",
    quantize_blocks,
    dequantize_blocks,
)
