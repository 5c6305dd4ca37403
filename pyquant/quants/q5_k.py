"""Q5_K: Q4_K with 5-bit codes: x = d * sc_j * q - dmin * m_j, q in 0..31, over 8 sub-blocks of 32.

Quantizer: quantize_row_q5_K_ref (ggml-quants.c), which is Q4_K's with nmax 31 and the trial grid
rmin -0.5, rdelta 0.1, 15 steps. qs holds the low nibbles in Q4_K's order; bit k of qh[l] is the fifth bit
of value 32k + l.
"""

# Q5_K: 256 values in 176 bytes = d:2 dmin:2 scales:12 qh:32 qs:128

import numpy as np
from gguf import GGMLQuantizationType

from .common import QK_K, BlockFormat, pack_bits, unpack_bits
from .q4_k import quantize_subblocks, subblock_scales

F32 = np.float32
BIT_SHIFTS = tuple(range(8))


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 176)."""
    d, dmin, scales, L = quantize_subblocks(x, 31, -0.5, 0.1, 15)
    qh = pack_bits((L >> np.uint8(4)).reshape(-1, 8, 32), BIT_SHIFTS)
    lo = (L & np.uint8(0x0F)).reshape(-1, 4, 2, 32)
    qs = lo[:, :, 0, :] | (lo[:, :, 1, :] << np.uint8(4))
    return np.concatenate([d, dmin, scales, qh, qs.reshape(-1, 128)], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 176) -> float32 (n, 256)."""
    sub_d, sub_m = subblock_scales(b)
    hi = unpack_bits(b[:, 16:48], BIT_SHIFTS, 1)  # (n, 8, 32)
    lo = b[:, 48:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = ((lo & np.uint8(0x0F)).reshape(-1, 8, 32) | (hi << np.uint8(4))).astype(F32)
    return (sub_d * q - sub_m).reshape(-1, QK_K)


FORMAT = BlockFormat(
    "q5_k",
    GGMLQuantizationType.Q5_K,
    QK_K,
    176,
    "d:2 dmin:2 scales:12 qh:32 qs:128",
    quantize_blocks,
    dequantize_blocks,
)
