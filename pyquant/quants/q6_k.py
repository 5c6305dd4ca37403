"""Q6_K: super-blocks of 256 values in 16 sub-blocks of 16; x = d * sc_j * (q - 32), q in 0..63, sc_j int8.

Layout per half h (values 128h..128h+127, as four quarters k of 32): ql byte 64h + l holds quarter 0 (low
nibble) and quarter 2 (high) of position l, byte 64h + 32 + l quarters 1 and 3; qh byte 32h + l holds the top
two bits of quarter k at bits 2k..2k+1.
Quantizer: quantize_row_q6_K_ref (ggml-quants.c): make_qx_quants (rmse_type 1) per sub-block, the scales
rounded onto -128..127 steps of the largest, codes recomputed against the stored scales.
"""

# Q6_K: 256 values in 210 bytes = ql:128 qh:64 scales:16 d:2

import numpy as np
from gguf import GGMLQuantizationType

from .common import (
    GROUP_MAX_EPS,
    QK_K,
    BlockFormat,
    f16_bytes,
    f16_field,
    f16_round,
    first_absmax,
    nearest_int,
    pack_bits,
    unpack_bits,
)
from .k_search import make_qx_quants

F32 = np.float32
CRUMB_SHIFTS = (0, 2, 4, 6)


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 210)."""
    n = x.shape[0]
    scales, L = make_qx_quants(x.reshape(n * 16, 16), 32)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)

    max_abs, max_scale = first_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, F32(0), F32(-128) / max_scale)
        d = np.where(zero, F32(0), F32(1) / iscale)
        sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    sc = np.where(zero[:, None], np.int8(0), sc)

    sub_d = f16_round(d)[:, None] * sc.astype(F32)
    with np.errstate(all="ignore"):
        q = nearest_int(x.reshape(n, 16, 16) / sub_d[:, :, None])
    L = np.where(sub_d[:, :, None] != 0, np.clip(q, -32, 31) + 32, L).astype(np.uint8)
    L = np.where(zero[:, None, None], np.uint8(0), L).reshape(n, 2, 4, 32)

    lo = L & np.uint8(0x0F)
    ql = np.concatenate(
        [lo[:, :, 0] | (lo[:, :, 2] << np.uint8(4)), lo[:, :, 1] | (lo[:, :, 3] << np.uint8(4))], axis=2
    )
    qh = pack_bits((L >> np.uint8(4)).reshape(n * 2, 4, 32), CRUMB_SHIFTS).reshape(n, 64)
    return np.concatenate([ql.reshape(n, 128), qh, sc.view(np.uint8), f16_bytes(d)], axis=1)


def dequantize_blocks(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 210) -> float32 (n, 256)."""
    d = f16_field(b[:, 208:210])
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8)
    sub_d = (d * sc.astype(F32))[:, :, None]  # (n, 16, 1)
    # per half: (2n, nibble, 64 bytes) -> quarter k = 2 * nibble + byte // 32, in order
    lo = unpack_bits(b[:, :128].reshape(-1, 64), (0, 4), 0x0F)
    hi = unpack_bits(b[:, 128:192].reshape(-1, 32), CRUMB_SHIFTS, 3)  # (2n, 4, 32)
    q = (lo.reshape(-1, 4, 32) | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)
    return (sub_d * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, QK_K)


FORMAT = BlockFormat(
    "q6_k",
    GGMLQuantizationType.Q6_K,
    QK_K,
    210,
    "ql:128 qh:64 scales:16 d:2",
    quantize_blocks,
    dequantize_blocks,
)
