"""Q4_K: super-blocks of 256 values in 8 sub-blocks of 32; x = d * sc_j * q - dmin * m_j, q in 0..15.

Each sub-block's scale and min are 6-bit codes sc_j, m_j (12-byte field, see `k_search.pack_scales_k4`) on
two float16 super-scales d, dmin. Quantizer: quantize_row_q4_K_ref (ggml-quants.c): make_qkx2_quants per
sub-block with weights av_x + |x|, then the scales and mins rounded onto 63 steps of their maxima, then the
codes recomputed against the stored scales. qs byte l of chunk c (c = 0..3) holds value 64c + l in its low
nibble and value 64c + 32 + l in its high nibble.
"""

# Q4_K: 256 values in 144 bytes = d:2 dmin:2 scales:12 qs:128

import numpy as np
from gguf import GGMLQuantizationType

from .common import QK_K, BlockFormat, f16_bytes, f16_field, f16_round, nearest_int, seqsum
from .k_search import make_qkx2_quants, pack_scales_k4, unpack_scales_k4

F32 = np.float32


def quantize_subblocks(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """float32 (n, 256) -> d, dmin f16 bytes (n, 2), scales field (n, 12), codes uint8 (n, 256) in 0..nmax.

    The shared body of Q4_K and Q5_K, which differ only in nmax and the trial-scale grid.
    """
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    av_x = np.sqrt(seqsum(xs * xs) / F32(32))
    w = av_x[:, None] + np.abs(xs)
    scales, mins, L = make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, use_mad=False)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)

    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d, dmin = max_scale / F32(63), max_min / F32(63)

    sub_d = f16_round(d)[:, None] * ls.astype(F32)  # (n, 8)
    sub_m = f16_round(dmin)[:, None] * lm.astype(F32)
    with np.errstate(all="ignore"):
        q = nearest_int((x.reshape(n, 8, 32) + sub_m[:, :, None]) / sub_d[:, :, None])
    L = np.where(sub_d[:, :, None] != 0, np.clip(q, 0, nmax), L).astype(np.uint8)
    return f16_bytes(d), f16_bytes(dmin), pack_scales_k4(ls, lm), L.reshape(n, QK_K)


def subblock_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d:2 dmin:2 scales:12 bytes (n, 16) -> d * sc_j, dmin * m_j, float32 (n, 8, 1) each."""
    sc, m = unpack_scales_k4(b[:, 4:16])
    d, dmin = f16_field(b[:, 0:2]), f16_field(b[:, 2:4])
    return (d * sc.astype(F32))[:, :, None], (dmin * m.astype(F32))[:, :, None]


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 144)."""
    d, dmin, scales, L = quantize_subblocks(x, 15, -1.0, 0.1, 20)
    L = L.reshape(-1, 4, 2, 32)
    qs = L[:, :, 0, :] | (L[:, :, 1, :] << np.uint8(4))
    return np.concatenate([d, dmin, scales, qs.reshape(-1, 128)], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 144) -> float32 (n, 256)."""
    sub_d, sub_m = subblock_scales(b)
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & np.uint8(0x0F)).reshape(-1, 8, 32).astype(F32)
    return (sub_d * q - sub_m).reshape(-1, QK_K)


FORMAT = BlockFormat(
    "q4_k",
    GGMLQuantizationType.Q4_K,
    QK_K,
    144,
    "d:2 dmin:2 scales:12 qs:128",
    quantize_blocks,
    dequantize_blocks,
)
