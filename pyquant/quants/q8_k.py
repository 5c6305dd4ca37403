"""Q8_K: 256 values as int8 codes on a float32 scale, plus the sums of each 16 codes; x = d * q.

The activation format of the K-quant dot products (bsums let the min terms of Q2_K..Q5_K be applied per
sub-block). Quantizer: quantize_row_q8_K_ref (ggml-quants.c): max is the value of largest |x|,
iscale = -127 / max, q = min(127, nearest_int(iscale * x)), d = 1 / iscale. (ggml used -128 / max until
the IQ2 kernels needed q >= -127; the clamp to 127 is a no-op since.) An all-zero block stores zeros.
"""

# Q8_K: 256 values in 292 bytes = d:4 qs:256 bsums:32

import numpy as np
from gguf import GGMLQuantizationType

from .common import QK_K, BlockFormat, first_absmax, nearest_int

F32 = np.float32


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 292)."""
    amax, vmax = first_absmax(x)
    zero = amax == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, F32(0), F32(-127) / vmax)
        d = np.where(zero, F32(0), F32(1) / iscale)
    q = np.minimum(nearest_int(iscale[:, None] * x), 127).astype(np.int8)
    bsums = q.reshape(-1, 16, 16).sum(axis=2, dtype=np.int16)
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 292) -> float32 (n, 256)."""
    d = np.ascontiguousarray(b[:, :4]).view(F32)  # (n, 1)
    return d * np.ascontiguousarray(b[:, 4:260]).view(np.int8).astype(F32)


FORMAT = BlockFormat(
    "q8_k", GGMLQuantizationType.Q8_K, QK_K, 292, "d:4 qs:256 bsums:32", quantize_blocks, dequantize_blocks
)
