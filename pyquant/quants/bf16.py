"""BF16: bfloat16, the top half of a float32; rounding as ggml_compute_fp32_to_bf16 (nearest even, NaN kept quiet)."""

# BF16: 1 value in 2 bytes = bf16:2

import numpy as np
from gguf import GGMLQuantizationType

from .common import BlockFormat


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 1) -> uint8 (n, 2)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet_nan = ((u >> np.uint32(16)) | np.uint32(64)).astype(np.uint16)
    rounded = (u.astype(np.uint64) + np.uint64(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint64(
        16
    )
    return np.where(is_nan, quiet_nan, rounded.astype(np.uint16)).view(np.uint8)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 2) -> float32 (n, 1)."""
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


FORMAT = BlockFormat("bf16", GGMLQuantizationType.BF16, 1, 2, "bf16:2", quantize_blocks, dequantize_blocks)
