"""Q5_0: 32 values as 5-bit codes q in 0..31 around 16, x = d * (q - 16); d = max / -16 (max has the largest |x|).

Follows quantize_row_q5_0_ref / dequantize_row_q5_0 (ggml-quants.c). qs holds the low nibbles as in Q4_0
(value j low, value j + 16 high); bit j of the little-endian uint32 qh is the fifth bit of value j.
"""

# Q5_0: 32 values in 22 bytes = d:2 qh:4 qs:16

import numpy as np
from gguf import GGMLQuantizationType

from .common import BlockFormat, f16_bytes, f16_field, first_absmax, pack_bits, unpack_bits


def pack_q5(q: np.ndarray) -> np.ndarray:
    """5-bit codes uint8 (n, 32) -> qh:4 qs:16 bytes (n, 20)."""
    qh = np.packbits(q >> np.uint8(4), axis=1, bitorder="little")  # (n, 4)
    qs = pack_bits((q & np.uint8(0x0F)).reshape(-1, 2, 16), (0, 4))
    return np.concatenate([qh, qs], axis=1)


def unpack_q5(b: np.ndarray) -> np.ndarray:
    """qh:4 qs:16 bytes (n, 20) -> 5-bit codes uint8 (n, 32)."""
    hi = np.unpackbits(b[:, :4], axis=1, bitorder="little")  # (n, 32)
    lo = unpack_bits(b[:, 4:], (0, 4), 0x0F).reshape(-1, 32)
    return lo | (hi << np.uint8(4))


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, 22)."""
    _, vmax = first_absmax(x)
    d = vmax / np.float32(-16)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(x * inv_d[:, None] + np.float32(16.5)).astype(np.int8)
    q = np.minimum(q, 31).astype(np.uint8)
    return np.concatenate([f16_bytes(d), pack_q5(q)], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 22) -> float32 (n, 32)."""
    d = f16_field(b[:, :2])
    q = unpack_q5(b[:, 2:]).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


FORMAT = BlockFormat(
    "q5_0", GGMLQuantizationType.Q5_0, 32, 22, "d:2 qh:4 qs:16", quantize_blocks, dequantize_blocks
)
