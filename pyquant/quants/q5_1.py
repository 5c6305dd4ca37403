"""Q5_1: 32 values as 5-bit codes q in 0..31 above a minimum, x = d * q + m; d = (max - min) / 31.

Follows quantize_row_q5_1_ref / dequantize_row_q5_1 (ggml-quants.c); the qh/qs bit layout is Q5_0's.
"""

# Q5_1: 32 values in 24 bytes = d:2 m:2 qh:4 qs:16

import numpy as np
from gguf import GGMLQuantizationType

from .common import BlockFormat, f16_bytes, f16_field, first_min_max
from .q5_0 import pack_q5, unpack_q5


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, 24)."""
    lo, hi = first_min_max(x)
    d = (hi - lo) / np.float32(31)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc((x - lo[:, None]) * inv_d[:, None] + np.float32(0.5)).astype(np.uint8)
    return np.concatenate([f16_bytes(d), f16_bytes(lo), pack_q5(q & np.uint8(0x1F))], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 24) -> float32 (n, 32)."""
    d, m = f16_field(b[:, 0:2]), f16_field(b[:, 2:4])
    return d * unpack_q5(b[:, 4:]).astype(np.float32) + m


FORMAT = BlockFormat(
    "q5_1", GGMLQuantizationType.Q5_1, 32, 24, "d:2 m:2 qh:4 qs:16", quantize_blocks, dequantize_blocks
)
