"""Q4_0: 32 values as 4-bit codes q in 0..15 around 8, x = d * (q - 8); d = max / -8 where max has the largest |x|.

Follows quantize_row_q4_0_ref / dequantize_row_q4_0 (ggml-quants.c). Byte j of qs holds value j in its low
nibble and value j + 16 in its high nibble.
"""

# Q4_0: 32 values in 18 bytes = d:2 qs:16

import numpy as np
from gguf import GGMLQuantizationType

from .common import BlockFormat, f16_bytes, f16_field, first_absmax, pack_bits, unpack_bits


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, 18)."""
    _, vmax = first_absmax(x)
    d = vmax / np.float32(-8)  # (n,)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(x * inv_d[:, None] + np.float32(8.5)).astype(np.int8)  # (n, 32), C's (int8_t) cast
    q = np.minimum(q, 15).astype(np.uint8).reshape(-1, 2, 16)
    return np.concatenate([f16_bytes(d), pack_bits(q, (0, 4))], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 18) -> float32 (n, 32)."""
    d = f16_field(b[:, :2])  # (n, 1)
    q = unpack_bits(b[:, 2:], (0, 4), 0x0F).reshape(-1, 32).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


FORMAT = BlockFormat(
    "q4_0", GGMLQuantizationType.Q4_0, 32, 18, "d:2 qs:16", quantize_blocks, dequantize_blocks
)
