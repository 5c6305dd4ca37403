"""Q4_1: 32 values as 4-bit codes q in 0..15 above a minimum, x = d * q + m; d = (max - min) / 15.

Follows quantize_row_q4_1_ref / dequantize_row_q4_1 (ggml-quants.c). Byte j of qs holds value j in its low
nibble and value j + 16 in its high nibble.
"""

# Q4_1: 32 values in 20 bytes = d:2 m:2 qs:16

import numpy as np
from gguf import GGMLQuantizationType

from .common import BlockFormat, f16_bytes, f16_field, first_min_max, pack_bits, unpack_bits


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, 20)."""
    lo, hi = first_min_max(x)
    d = (hi - lo) / np.float32(15)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc((x - lo[:, None]) * inv_d[:, None] + np.float32(0.5)).astype(np.int8)
    q = np.minimum(q, 15).astype(np.uint8).reshape(-1, 2, 16)
    return np.concatenate([f16_bytes(d), f16_bytes(lo), pack_bits(q, (0, 4))], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 20) -> float32 (n, 32)."""
    d, m = f16_field(b[:, 0:2]), f16_field(b[:, 2:4])
    q = unpack_bits(b[:, 4:], (0, 4), 0x0F).reshape(-1, 32).astype(np.float32)
    return d * q + m


FORMAT = BlockFormat(
    "q4_1", GGMLQuantizationType.Q4_1, 32, 20, "d:2 m:2 qs:16", quantize_blocks, dequantize_blocks
)
