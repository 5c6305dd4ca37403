"""Register decoders of the K-quant super-blocks (q2_k, q3_k, q4_k, q5_k, q6_k).

`dq16_<type>(row, blk, g)` returns values 16g..16g+15 (g = 0..15) of super-block `blk` of a packed row as
float32x16, computed as ggml's dequantize_row_<type>. Byte maps, as in pyquant.quants:

    # Q2_K: 256 values in 84 bytes  = scales:16 qs:64 d:2 dmin:2        x = d*sc_j*q - dmin*m_j (16 x 16)
    # Q3_K: 256 values in 110 bytes = hmask:32 qs:64 scales:12 d:2      x = d*(s_j - 32)*(q - 4) (16 x 16)
    # Q4_K: 256 values in 144 bytes = d:2 dmin:2 scales:12 qs:128       x = d*sc_j*q - dmin*m_j (8 x 32)
    # Q5_K: 256 values in 176 bytes = d:2 dmin:2 scales:12 qh:32 qs:128 (as Q4_K, 5-bit q)
    # Q6_K: 256 values in 210 bytes = ql:128 qh:64 scales:16 d:2        x = d*sc_j*(q - 32) (16 x 16)
2-bit fields (q2_k, q3_k low bits): byte 32h + l holds value 128h + 32k + l at bits 2k..2k+1.
4-bit fields (q4_k, q5_k): byte 32c + l holds value 64c + l (low nibble) and 64c + 32 + l (high nibble).

`vdot_<type>(row0, row1, xq, xd, xs)` is two rows' dot products with one token's int8 activations, as
ggml_vec_dot_<type>_q8_K but on the 32-value activation blocks of act_quant.quantize_act: for each 32 values
the codes as unsigned bytes (simd_i8.idot) times the sub-block scale(s), the mins and offsets through the
activation sums of 16.
"""

from __future__ import annotations

import numpy as np

from .jit import inline
from .simd import (
    fload,
    fmul,
    fsplat,
    fsub,
    fsum,
    half_at,
    iand,
    iload_i8,
    iload_u8,
    ior,
    ishl,
    ishr,
    isub,
    itof,
)
from .simd_i8 import (
    bfield,
    bload,
    bor,
    bshl,
    f8fma_i,
    f8fma_i2,
    f8fma_iv,
    f8pair,
    f8scale,
    f8sum,
    f8zero,
    idot,
    izero8,
)

F32 = np.float32


@inline
def scale_min_k4(row, o, j):
    """6-bit scale and min of sub-block j from the 12-byte field at row[o] (ggml's get_scale_min_k4), as
    one expression for both halves (j < 4: low 6 bits of bytes j, j + 4; else the nibbles of byte j + 4
    with the top bits of bytes j - 4, j), so that it inlines without branches."""
    i, hi = j % 4, j // 4
    a, b, c = np.int64(row[o + i]), np.int64(row[o + 4 + i]), np.int64(row[o + 8 + i])
    sc = (1 - hi) * (a & 63) + hi * ((c & 0x0F) | ((a >> 6) << 4))
    m = (1 - hi) * (b & 63) + hi * ((c >> 4) | ((b >> 6) << 4))
    return sc, m


@inline
def crumbs(row, o, g):
    """2-bit codes of values 16g..16g+15 from a 64-byte 2-bit field at row[o]."""
    h, k, l0 = g // 8, (g % 8) // 2, 16 * (g % 2)
    return iand(ishr(iload_u8(row, o + 32 * h + l0), 2 * k), 3)


@inline
def dq16_q2_k(row, blk, g):
    o = blk * 84
    sc = row[o + g]
    d = half_at(row, o + 80) * F32(sc & 0x0F)
    m = half_at(row, o + 82) * F32(sc >> 4)
    return fsub(fmul(fsplat(d), itof(crumbs(row, o + 16, g))), fsplat(m))


@inline
def dq16_q3_k(row, blk, g):
    o = blk * 110
    s = ((row[o + 96 + g % 8] >> (4 * (g // 8))) & 0x0F) | (
        ((row[o + 104 + g % 4] >> (2 * (g // 4))) & 3) << 4
    )
    hbit = iand(ishr(iload_u8(row, o + 16 * (g % 2)), g // 2), 1)
    q = ior(crumbs(row, o + 32, g), ishl(hbit, 2))
    return fmul(fsplat(half_at(row, o + 108) * F32(s - 32)), itof(isub(q, 4)))


@inline
def dq16_q4_k(row, blk, g):
    o = blk * 144
    j = g // 2
    sc, m = scale_min_k4(row, o + 4, j)
    q = iand(ishr(iload_u8(row, o + 16 + 32 * (j // 2) + 16 * (g % 2)), 4 * (j % 2)), 15)
    return fsub(fmul(fsplat(half_at(row, o) * F32(sc)), itof(q)), fsplat(half_at(row, o + 2) * F32(m)))


@inline
def dq16_q5_k(row, blk, g):
    o = blk * 176
    j = g // 2
    sc, m = scale_min_k4(row, o + 4, j)
    lo = iand(ishr(iload_u8(row, o + 48 + 32 * (j // 2) + 16 * (g % 2)), 4 * (j % 2)), 15)
    hi = ishl(iand(ishr(iload_u8(row, o + 16 + 16 * (g % 2)), j), 1), 4)
    return fsub(
        fmul(fsplat(half_at(row, o) * F32(sc)), itof(ior(lo, hi))), fsplat(half_at(row, o + 2) * F32(m))
    )


@inline
def dq16_q6_k(row, blk, g):
    o = blk * 210
    h, k, l0 = g // 8, (g % 8) // 2, 16 * (g % 2)
    lo = iand(ishr(iload_u8(row, o + 64 * h + 32 * (k % 2) + l0), 4 * (k // 2)), 15)
    hi = ishl(iand(ishr(iload_u8(row, o + 128 + 32 * h + l0), 2 * k), 3), 4)
    sc = (row[o + 192 + g] ^ 0x80) - 0x80  # int8
    return fmul(fsplat(half_at(row, o + 208) * F32(sc)), itof(isub(ior(lo, hi), 32)))


@inline
def _crumbs32(row, o, j):
    """2-bit codes of values 32j..32j+31 of a 64-byte 2-bit field at row[o], as bytes."""
    return bfield(bload(row, o + 32 * (j // 4)), 2 * (j % 4), 3)


@inline
def _vdot1_q2_k(row, xq, xd, xs):
    acc = f8zero()
    corr = F32(0)
    for blk in range(xq.shape[0] // 256):
        o = blk * 84
        d, dmin = half_at(row, o + 80), half_at(row, o + 82)
        for j in range(8):
            a = 8 * blk + j
            sa, sb = row[o + 2 * j], row[o + 2 * j + 1]
            p = idot(izero8(), _crumbs32(row, o + 16, j), bload(xq, 32 * a))
            dx = d * xd[a]
            acc = f8fma_i2(p, dx * F32(sa & 15), dx * F32(sb & 15), acc)
        corr += dmin * fsum(fmul(itof(ishr(iload_u8(row, o), 4)), fload(xs, 16 * blk)))  # the 16 mins
    return f8sum(acc) - corr


@inline
def _vdot1_q3_k(row, xq, xd, xs):
    acc = f8zero()
    corr = F32(0)
    for blk in range(xq.shape[0] // 256):
        o = blk * 110
        d = half_at(row, o + 108)
        hmask = bload(row, o)
        for j in range(8):
            a = 8 * blk + j
            ga, gb = 2 * j, 2 * j + 1
            sa = ((row[o + 96 + ga % 8] >> (4 * (ga // 8))) & 15) | (
                ((row[o + 104 + ga % 4] >> (2 * (ga // 4))) & 3) << 4
            )
            sb = ((row[o + 96 + gb % 8] >> (4 * (gb // 8))) & 15) | (
                ((row[o + 104 + gb % 4] >> (2 * (gb // 4))) & 3) << 4
            )
            q = bor(_crumbs32(row, o + 32, j), bshl(bfield(hmask, j, 1), 2))
            p = idot(izero8(), q, bload(xq, 32 * a))
            dx = d * xd[a]
            acc = f8fma_i2(p, dx * F32(sa - 32), dx * F32(sb - 32), acc)
            corr += d * (F32(sa - 32) * xs[2 * a] + F32(sb - 32) * xs[2 * a + 1])
    return f8sum(acc) - F32(4) * corr


@inline
def _vdot_k4(row, xq, xd, xs, size, qs_at, has_qh):
    """Q4_K and Q5_K: sub-blocks of 32 with 6-bit scales and mins."""
    acc = f8zero()
    corr = F32(0)
    for blk in range(xq.shape[0] // 256):
        o = blk * size
        d, dmin = half_at(row, o), half_at(row, o + 2)
        for j in range(8):
            a = 8 * blk + j
            sc, m = scale_min_k4(row, o + 4, j)
            q = bfield(bload(row, o + qs_at + 32 * (j // 2)), 4 * (j % 2), 15)
            if has_qh:
                q = bor(q, bshl(bfield(bload(row, o + 16), j, 1), 4))
            acc = f8fma_i(idot(izero8(), q, bload(xq, 32 * a)), d * F32(sc) * xd[a], acc)
            corr += dmin * F32(m) * (xs[2 * a] + xs[2 * a + 1])
    return f8sum(acc) - corr


@inline
def vdot_q4_k(row0, row1, xq, xd, xs):
    return _vdot_k4(row0, xq, xd, xs, 144, 16, False), _vdot_k4(row1, xq, xd, xs, 144, 16, False)


@inline
def vdot_q5_k(row0, row1, xq, xd, xs):
    return _vdot_k4(row0, xq, xd, xs, 176, 48, True), _vdot_k4(row1, xq, xd, xs, 176, 48, True)


@inline
def _vdot1_q6_k(row, xq, xd, xs):
    acc = f8zero()
    corr = F32(0)
    for blk in range(xq.shape[0] // 256):
        o = blk * 210
        scales = fmul(itof(iload_i8(row, o + 192)), fsplat(half_at(row, o + 208)))  # d * sc_j, 16 lanes
        for j in range(8):
            a = 8 * blk + j
            h, k = j // 4, j % 4
            lo = bfield(bload(row, o + 64 * h + 32 * (k % 2)), 4 * (k // 2), 15)
            hi = bshl(bfield(bload(row, o + 128 + 32 * h), 2 * k, 3), 4)
            p = idot(izero8(), bor(lo, hi), bload(xq, 32 * a))
            acc = f8fma_iv(p, f8scale(f8pair(scales, j), xd[a]), acc)
        # the offset 32 against the 16 sub-block scales, as one 16-lane dot product per super-block
        corr += fsum(fmul(scales, fload(xs, 16 * blk)))
    return f8sum(acc) - F32(32) * corr


@inline
def vdot_q2_k(row0, row1, xq, xd, xs):
    return _vdot1_q2_k(row0, xq, xd, xs), _vdot1_q2_k(row1, xq, xd, xs)


@inline
def vdot_q3_k(row0, row1, xq, xd, xs):
    return _vdot1_q3_k(row0, xq, xd, xs), _vdot1_q3_k(row1, xq, xd, xs)


@inline
def vdot_q6_k(row0, row1, xq, xd, xs):
    return _vdot1_q6_k(row0, xq, xd, xs), _vdot1_q6_k(row1, xq, xd, xs)
