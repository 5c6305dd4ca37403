"""F16: IEEE half floats, one per 2 bytes; float32 -> float16 rounds to nearest even (GGML_FP32_TO_FP16)."""

# F16: 1 value in 2 bytes = f16:2

import numpy as np
from gguf import GGMLQuantizationType

from .common import BlockFormat


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 1) -> uint8 (n, 2)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint8)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 2) -> float32 (n, 1)."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


FORMAT = BlockFormat("f16", GGMLQuantizationType.F16, 1, 2, "f16:2", quantize_blocks, dequantize_blocks)
