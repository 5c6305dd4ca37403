"""Register decoders of the 32-value block formats (q4_0, q4_1, q5_0, q5_1, q8_0) and the float rows.

Each `dq16_<type>(row, blk, g)` returns values 16g..16g+15 of block `blk` of a packed row (uint8, GGUF
bytes) as float32x16, computed as ggml's dequantize_row_<type> does (ggml-quants.c). Byte maps, as in
pyquant.quants:

    # Q4_0: 32 values in 18 bytes = d:2 qs:16            x = d * (q - 8)
    # Q4_1: 32 values in 20 bytes = d:2 m:2 qs:16        x = d * q + m
    # Q5_0: 32 values in 22 bytes = d:2 qh:4 qs:16       x = d * (q - 16)
    # Q5_1: 32 values in 24 bytes = d:2 m:2 qh:4 qs:16   x = d * q + m
    # Q8_0: 32 values in 34 bytes = d:2 qs:32            x = d * q
qs byte j holds value j (low nibble) and value j + 16 (high nibble); bit j of qh is value j's fifth bit.
Float rows are read as blocks of 32 values too (f32: 128 bytes, f16 and bf16: 64 bytes).

Each `vdot_<type>(row0, row1, xq, xd, xs)` is two rows' dot products with one token's int8 activations
(codes xq, block scales xd, d * sums of 16 codes xs; act_quant.quantize_act), as ggml_vec_dot_<type>_q8_0:
the codes as
unsigned bytes against the int8 activations (simd_i8.idot), one float multiply-add per block, and the
codes' offset taken back out through the activation sums.
"""

from __future__ import annotations

import numpy as np

from .jit import inline
from .simd import (
    fadd,
    fload,
    fload_bf,
    fload_h,
    fmul,
    fsplat,
    half_at,
    iand,
    ibits,
    iload_i8,
    iload_u8,
    ior,
    ishl,
    ishr,
    isub,
    itof,
    u32_at,
)
from .simd_i8 import bbits, bload, bnib, bor, bxor, f8fma_i, f8sum, f8zero, idot, izero8


@inline
def nibbles(row, o, g):
    """The 16 4-bit codes of group g (low nibbles for g = 0, high for g = 1) of the 16 bytes at row[o]."""
    return iand(ishr(iload_u8(row, o), 4 * g), 15)


@inline
def fifth_bits(row, o, g):
    """Bits 16g..16g+15 of the little-endian uint32 at row[o], moved to bit 4 of each lane."""
    return ishl(ibits(u32_at(row, o) >> (16 * g)), 4)


@inline
def dq16_q4_0(row, blk, g):
    o = blk * 18
    return fmul(fsplat(half_at(row, o)), itof(isub(nibbles(row, o + 2, g), 8)))


@inline
def dq16_q4_1(row, blk, g):
    o = blk * 20
    return fadd(fmul(fsplat(half_at(row, o)), itof(nibbles(row, o + 4, g))), fsplat(half_at(row, o + 2)))


@inline
def dq16_q5_0(row, blk, g):
    o = blk * 22
    q = ior(nibbles(row, o + 6, g), fifth_bits(row, o + 2, g))
    return fmul(fsplat(half_at(row, o)), itof(isub(q, 16)))


@inline
def dq16_q5_1(row, blk, g):
    o = blk * 24
    q = ior(nibbles(row, o + 8, g), fifth_bits(row, o + 4, g))
    return fadd(fmul(fsplat(half_at(row, o)), itof(q)), fsplat(half_at(row, o + 2)))


@inline
def dq16_q8_0(row, blk, g):
    o = blk * 34
    return fmul(fsplat(half_at(row, o)), itof(iload_i8(row, o + 2 + 16 * g)))


@inline
def dq16_f32(row, blk, g):
    return fload(row, blk * 128 + 64 * g)


@inline
def dq16_f16(row, blk, g):
    return fload_h(row, blk * 64 + 32 * g)


@inline
def dq16_bf16(row, blk, g):
    return fload_bf(row, blk * 64 + 32 * g)


@inline
def _codes(row, o, qs_at, qh_at, is_q8):
    """The 32 codes of the block at row[o] as unsigned bytes: nibbles (+ fifth bits), or int8 + 128."""
    if is_q8:
        return bxor(bload(row, o + qs_at), 0x80)
    if qh_at:
        return bor(bnib(row, o + qs_at), bbits(row, o + qh_at, 16))
    return bnib(row, o + qs_at)


@inline
def _vdot_blocks(row0, row1, xq, xd, xs, size, qs_at, qh_at, offset, has_min, is_q8):
    """Two rows' dot products with one token (the activation block loaded once for both), for every 32-value
    format: x = d * (q - offset) (+ m). Sums of d * (activation block sum) carry the offset and the min."""
    acc0, acc1 = f8zero(), f8zero()
    off0, off1 = np.float32(0), np.float32(0)
    min0, min1 = np.float32(0), np.float32(0)
    for b in range(xq.shape[0] // 32):
        o = b * size
        xb, dx, sx = bload(xq, 32 * b), xd[b], xs[2 * b] + xs[2 * b + 1]
        d0, d1 = half_at(row0, o), half_at(row1, o)
        acc0 = f8fma_i(idot(izero8(), _codes(row0, o, qs_at, qh_at, is_q8), xb), d0 * dx, acc0)
        acc1 = f8fma_i(idot(izero8(), _codes(row1, o, qs_at, qh_at, is_q8), xb), d1 * dx, acc1)
        off0 += d0 * sx
        off1 += d1 * sx
        if has_min:
            min0 += half_at(row0, o + 2) * sx
            min1 += half_at(row1, o + 2) * sx
    return f8sum(acc0) + min0 - offset * off0, f8sum(acc1) + min1 - offset * off1


@inline
def vdot_q4_0(row0, row1, xq, xd, xs):
    return _vdot_blocks(row0, row1, xq, xd, xs, 18, 2, 0, np.float32(8), False, False)


@inline
def vdot_q4_1(row0, row1, xq, xd, xs):
    return _vdot_blocks(row0, row1, xq, xd, xs, 20, 4, 0, np.float32(0), True, False)


@inline
def vdot_q5_0(row0, row1, xq, xd, xs):
    return _vdot_blocks(row0, row1, xq, xd, xs, 22, 6, 2, np.float32(16), False, False)


@inline
def vdot_q5_1(row0, row1, xq, xd, xs):
    return _vdot_blocks(row0, row1, xq, xd, xs, 24, 8, 4, np.float32(0), True, False)


@inline
def vdot_q8_0(row0, row1, xq, xd, xs):
    return _vdot_blocks(row0, row1, xq, xd, xs, 34, 2, 0, np.float32(128), False, True)
