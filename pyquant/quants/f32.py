"""F32: plain IEEE float32 values, one per 4 bytes (a "block" of one value)."""

# F32: 1 value in 4 bytes = f32:4

import numpy as np
from gguf import GGMLQuantizationType

from .common import BlockFormat


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 1) -> uint8 (n, 4)."""
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 4) -> float32 (n, 1)."""
    return np.ascontiguousarray(b).view(np.float32).copy()


FORMAT = BlockFormat("f32", GGMLQuantizationType.F32, 1, 4, "f32:4", quantize_blocks, dequantize_blocks)
