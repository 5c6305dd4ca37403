"""Q8_0: 32 values as int8 codes, x = d * q; d = max|x| / 127, q = roundf(x / d) (half away from zero).

Follows quantize_row_q8_0_ref / dequantize_row_q8_0 (ggml-quants.c): the bytes a GGUF file stores. Also the
activation format that the Q4_0/Q5_0/Q8_0 dot products take; for activations llama.cpp's x86 CPU backend
(AVX paths of quantize_row_q8_0 in ggml-cpu) rounds differently, see `quantize_blocks_x86`.
"""

# Q8_0: 32 values in 34 bytes = d:2 qs:32

import numpy as np
from gguf import GGMLQuantizationType

from .common import BlockFormat, f16_bytes, f16_field


def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: nearest integer, halves away from zero (exact: no `+ 0.5` that could round up)."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.copysign(whole + np.floor(np.float32(2) * (a - whole)), x)


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, 34)."""
    d = np.abs(x).max(axis=1) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = roundf(x * inv_d[:, None]).astype(np.int8)
    return np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=1)


def quantize_blocks_x86(x: np.ndarray) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, 34), as llama.cpp's x86 SIMD code quantizes activations at run time:
    the codes are rint(x * (127 / max|x|)), halves to even, instead of roundf(x * (1 / (max|x| / 127))).
    Differs from `quantize_blocks` in about 1 block in 10^4 (a code off by one)."""
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        inv_d = np.where(amax == 0, np.float32(0), np.float32(127) / amax)
    q = np.rint(x * inv_d[:, None]).astype(np.int8)
    return np.concatenate([f16_bytes(amax / np.float32(127)), q.view(np.uint8)], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 34) -> float32 (n, 32)."""
    d = f16_field(b[:, :2])
    return np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32) * d


FORMAT = BlockFormat(
    "q8_0", GGMLQuantizationType.Q8_0, 32, 34, "d:2 qs:32", quantize_blocks, dequantize_blocks
)
