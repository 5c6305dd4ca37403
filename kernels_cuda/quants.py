"""Weights on the GPU: the GGUF blocks repacked for aligned reads, the register decoders the kernels share,
and the int8 codes + scales that the tensor-core GEMM reads.

Repacked layout (host side, numpy, once per weight): the float16 fields of every block (d, and m / dmin) are
moved to a float32 array `d` (N, blocks * DB) and the remaining bytes kept in order in `q`, read as uint32 words
(N, blocks * QB / 4): a decoder loads its 8 bytes as two words. Float rows (f32, f16, bf16) go to `d` as float32
values in blocks of 32. Byte maps of `q` per block (every QB and every field offset is a multiple of 4):

    # Q4_0: 16 = qs:16                      x = d * (q - 8)            d:1
    # Q4_1: 16 = qs:16                      x = d * q + m              d:2 (d, m)
    # Q5_0: 20 = qh:4 qs:16                 x = d * (q - 16)           d:1
    # Q5_1: 20 = qh:4 qs:16                 x = d * q + m              d:2 (d, m)
    # Q8_0: 32 = qs:32 (int8)               x = d * q                  d:1
    # Q4_K: 140 = scales:12 qs:128          x = d*sc_j*q - dmin*m_j    d:2 (d, dmin)
    # Q5_K: 172 = scales:12 qh:32 qs:128    (as Q4_K, 5-bit q)         d:2 (d, dmin)
    # Q6_K: 208 = ql:128 qh:64 scales:16    x = d*sc_j*(q - 32)        d:1

`dec8_<type>(q, d, n, blk, g, v)` writes values 8g..8g+7 of block blk of row n into v (float32, 8), computed
as pyquant.quants' dequantize_blocks does (the same float32 products, so decoded weights are bit-exact).
The CPU backend's decoders (kernels_cpu/quants_*.py) work on 16-lane SIMD vectors built by intrinsics that
only exist on the CPU target, so the scalar versions here are written for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyquant.errors import PyquantError
from pyquant.quants import dequantize, get_format
from pyquant.quants.common import f16_field, unpack_bits
from pyquant.quants.k_search import unpack_scales_k4

from .jit import device

# ---- decoders -------------------------------------------------------------------------------------------


@device
def dec8_f32(q, d, n, blk, g, v):
    o = blk * 32 + 8 * g
    for i in range(8):
        v[i] = d[n, o + i]


@device
def _nib(w0, w1, i, s, mask):
    """Bits s.. of byte i (0..7) of the 8-byte run held in the words w0, w1 (little-endian), masked."""
    return ((w0 if i < 4 else w1) >> (8 * (i % 4) + s)) & mask


@device
def _byte(q, n, o):
    """Byte o of row n of the word array q."""
    return (q[n, o // 4] >> (8 * (o % 4))) & 255


@device
def dec8_q4_0(q, d, n, blk, g, v):
    o = (blk * 16 + 8 * (g % 2)) // 4
    w0, w1 = q[n, o], q[n, o + 1]
    s = 4 * (g // 2)
    dd = d[n, blk]
    for i in range(8):
        v[i] = dd * np.float32(np.int32(_nib(w0, w1, i, s, 15)) - 8)


@device
def dec8_q4_1(q, d, n, blk, g, v):
    o = (blk * 16 + 8 * (g % 2)) // 4
    w0, w1 = q[n, o], q[n, o + 1]
    s = 4 * (g // 2)
    dd = d[n, 2 * blk]
    m = d[n, 2 * blk + 1]
    for i in range(8):
        v[i] = dd * np.float32(_nib(w0, w1, i, s, 15)) + m


@device
def dec8_q5_0(q, d, n, blk, g, v):
    o = blk * 5
    qh = q[n, o] >> (8 * g)
    o2 = o + 1 + 2 * (g % 2)
    w0, w1 = q[n, o2], q[n, o2 + 1]
    s = 4 * (g // 2)
    dd = d[n, blk]
    for i in range(8):
        c = _nib(w0, w1, i, s, 15) | (((qh >> i) & 1) << 4)
        v[i] = dd * np.float32(np.int32(c) - 16)


@device
def dec8_q5_1(q, d, n, blk, g, v):
    o = blk * 5
    qh = q[n, o] >> (8 * g)
    o2 = o + 1 + 2 * (g % 2)
    w0, w1 = q[n, o2], q[n, o2 + 1]
    s = 4 * (g // 2)
    dd = d[n, 2 * blk]
    m = d[n, 2 * blk + 1]
    for i in range(8):
        c = _nib(w0, w1, i, s, 15) | (((qh >> i) & 1) << 4)
        v[i] = dd * np.float32(c) + m


@device
def dec8_q8_0(q, d, n, blk, g, v):
    o = blk * 8 + 2 * g
    w0, w1 = q[n, o], q[n, o + 1]
    dd = d[n, blk]
    for i in range(8):
        c = np.int32(_nib(w0, w1, i, 0, 255))
        v[i] = dd * np.float32(c - 256 if c >= 128 else c)


@device
def scale_min_k4(q, n, o, j):
    """6-bit scale and min of sub-block j from the 12-byte field at byte o of row n (ggml's get_scale_min_k4)."""
    if j < 4:
        return _byte(q, n, o + j) & 63, _byte(q, n, o + j + 4) & 63
    sc = (_byte(q, n, o + j + 4) & 0x0F) | ((_byte(q, n, o + j - 4) >> 6) << 4)
    m = (_byte(q, n, o + j + 4) >> 4) | ((_byte(q, n, o + j) >> 6) << 4)
    return sc, m


@device
def dec8_q4_k(q, d, n, blk, g, v):
    o = blk * 140
    j = g // 4  # sub-block of 32
    sc, m = scale_min_k4(q, n, o, j)
    ds = d[n, 2 * blk] * np.float32(sc)
    dm = d[n, 2 * blk + 1] * np.float32(m)
    o2 = (o + 12 + 32 * (j // 2) + 8 * (g % 4)) // 4
    w0, w1 = q[n, o2], q[n, o2 + 1]
    s = 4 * (j % 2)
    for i in range(8):
        v[i] = ds * np.float32(_nib(w0, w1, i, s, 15)) - dm


@device
def dec8_q5_k(q, d, n, blk, g, v):
    o = blk * 172
    j = g // 4
    sc, m = scale_min_k4(q, n, o, j)
    ds = d[n, 2 * blk] * np.float32(sc)
    dm = d[n, 2 * blk + 1] * np.float32(m)
    l0 = 8 * (g % 4)
    o2 = (o + 44 + 32 * (j // 2) + l0) // 4
    oh = (o + 12 + l0) // 4
    w0, w1, h0, h1 = q[n, o2], q[n, o2 + 1], q[n, oh], q[n, oh + 1]
    s = 4 * (j % 2)
    for i in range(8):
        c = _nib(w0, w1, i, s, 15) | (_nib(h0, h1, i, j, 1) << 4)
        v[i] = ds * np.float32(c) - dm


@device
def dec8_q6_k(q, d, n, blk, g, v):
    o = blk * 208
    v0 = 8 * g
    h = v0 // 128
    k = (v0 % 128) // 32
    l0 = v0 % 32
    o_lo = (o + 64 * h + 32 * (k % 2) + l0) // 4
    o_hi = (o + 128 + 32 * h + l0) // 4
    w0, w1, h0, h1 = q[n, o_lo], q[n, o_lo + 1], q[n, o_hi], q[n, o_hi + 1]
    s_lo = 4 * (k // 2)
    s_hi = 2 * k
    sc = np.int32(_byte(q, n, o + 192 + v0 // 16))
    ds = d[n, blk] * np.float32(sc - 256 if sc >= 128 else sc)
    for i in range(8):
        c = _nib(w0, w1, i, s_lo, 15) | (_nib(h0, h1, i, s_hi, 3) << 4)
        v[i] = ds * np.float32(np.int32(c) - 32)


# ---- formats as data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuFormat:
    name: str
    block_values: int  # values per block (float rows: 32)
    qb: int  # bytes of q per block
    db: int  # float32 d entries per block
    dec8: object


GPU_FORMATS = {
    f.name: f
    for f in (
        GpuFormat("f32", 32, 0, 32, dec8_f32),
        GpuFormat("f16", 32, 0, 32, dec8_f32),
        GpuFormat("bf16", 32, 0, 32, dec8_f32),
        GpuFormat("q4_0", 32, 16, 1, dec8_q4_0),
        GpuFormat("q4_1", 32, 16, 2, dec8_q4_1),
        GpuFormat("q5_0", 32, 20, 1, dec8_q5_0),
        GpuFormat("q5_1", 32, 20, 2, dec8_q5_1),
        GpuFormat("q8_0", 32, 32, 1, dec8_q8_0),
        GpuFormat("q4_k", 256, 140, 2, dec8_q4_k),
        GpuFormat("q5_k", 256, 172, 2, dec8_q5_k),
        GpuFormat("q6_k", 256, 208, 1, dec8_q6_k),
    )
}


def gpu_format(name: str) -> GpuFormat:
    if name not in GPU_FORMATS:
        raise PyquantError(f"the CUDA backend has no kernels for {name!r}; it runs {', '.join(GPU_FORMATS)}")
    return GPU_FORMATS[name]


# float16 fields (byte offset in the GGUF block) moved to d, per format, in order
_D_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q4_k": (0, 2),
             "q5_k": (0, 2), "q6_k": (208,)}


def repack(packed: np.ndarray, type: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """GGUF bytes of an (N, K) matrix -> (q uint32 (N, blocks*QB/4), d float32 (N, blocks*DB)), see the top.
    q goes as little-endian words (every QB and every field the decoders read is 4-byte aligned): a decoder
    takes its 8 bytes in two word loads instead of eight byte loads."""
    fmt = gpu_format(type)
    n, k = shape
    nb = k // fmt.block_values
    if fmt.qb == 0:
        return np.zeros((1, 1), np.uint32), np.ascontiguousarray(dequantize(packed, type, shape), np.float32)
    src = get_format(type)
    blocks = np.ascontiguousarray(packed).reshape(-1).view(np.uint8).reshape(n * nb, src.type_size)
    fields = _D_FIELDS[type]
    d = np.concatenate([f16_field(blocks[:, o : o + 2]) for o in fields], axis=1)
    keep = np.ones(src.type_size, bool)
    for o in fields:
        keep[o : o + 2] = False
    q = blocks[:, keep]
    q = np.ascontiguousarray(q.reshape(n, nb * fmt.qb)).view("<u4")
    return q, np.ascontiguousarray(d.reshape(n, nb * fmt.db))


# ---- int8 codes for the tensor-core GEMM -------------------------------------------------------------------


def int8_codes(packed: np.ndarray, type: str, shape: tuple[int, int]):
    """GGUF bytes of an (N, K) matrix -> (codes int8 (N, K), scales float32 (N, K/16), mins float32 (N, K/32)
    or None) with weight[n, k] = scales[n, k // 16] * codes[n, k] - mins[n, k // 32] exactly (float32), or
    None for types without integer codes (float rows)."""
    if type not in _D_FIELDS:
        return None
    n, k = shape
    fmt = get_format(type)
    b = np.ascontiguousarray(packed).reshape(-1).view(np.uint8).reshape(-1, fmt.type_size)
    nb = b.shape[0]
    mins = None
    if type in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
        d = f16_field(b[:, 0:2])  # (nb, 1)
        if type == "q8_0":
            codes = np.ascontiguousarray(b[:, 2:]).view(np.int8)
        else:
            qo = {"q4_0": 2, "q4_1": 4, "q5_0": 6, "q5_1": 8}[type]
            codes = unpack_bits(b[:, qo : qo + 16], (0, 4), 0x0F).reshape(nb, 32).astype(np.int16)
            if type in ("q5_0", "q5_1"):
                ho = qo - 4
                codes |= np.unpackbits(b[:, ho : ho + 4], axis=1, bitorder="little").astype(np.int16) << 4
            codes = (codes - {"q4_0": 8, "q4_1": 0, "q5_0": 16, "q5_1": 0}[type]).astype(np.int8)
        scales = np.repeat(d, 2, axis=1)
        if type in ("q4_1", "q5_1"):
            mins = -f16_field(b[:, 2:4])
    elif type in ("q4_k", "q5_k"):
        sc, mn = unpack_scales_k4(b[:, 4:16])
        d, dmin = f16_field(b[:, 0:2]), f16_field(b[:, 2:4])
        qo = 16 if type == "q4_k" else 48
        lo = (b[:, qo:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(15)
        codes = lo.reshape(nb, 8, 32)
        if type == "q5_k":
            codes = codes | (unpack_bits(b[:, 16:48], tuple(range(8)), 1) << np.uint8(4))
        codes = codes.reshape(nb, 256).astype(np.int8)
        scales = np.repeat(d * sc.astype(np.float32), 2, axis=1)
        mins = dmin * mn.astype(np.float32)
    else:  # q6_k
        d = f16_field(b[:, 208:210])
        scales = d * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
        lo = unpack_bits(b[:, :128].reshape(-1, 64), (0, 4), 0x0F)
        hi = unpack_bits(b[:, 128:192].reshape(-1, 32), (0, 2, 4, 6), 3)
        codes = ((lo.reshape(-1, 4, 32) | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(nb, 256)
    codes = np.ascontiguousarray(codes, np.int8).reshape(n, k)
    scales = np.ascontiguousarray(scales, np.float32).reshape(n, k // 16)
    if mins is not None:
        mins = np.ascontiguousarray(mins, np.float32).reshape(n, k // 32)
    return codes, scales, mins
