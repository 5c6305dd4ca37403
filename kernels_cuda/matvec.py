"""Products with packed weights: the dequantizing GEMV of decode, its float GEMM sibling for longer inputs,
and the embedding row gather. One kernel per (format, input mode, tokens), built on first use.

    y[t, n] = sum_k w[n, k] * in(x)[t, k] (+ bias[n]);  z[t, n] = y[t, n] + res[t, n] when HAS_RES

Input modes fuse the op that produced the activation into the product, so decode reads it once:
    PLAIN   in(x) = x
    RMS     in(x) = x * rsqrt(mean(x^2) + eps) * nw      (RMSNorm, computed per block from x)
    SWIGLU  in(x) = silu(x) * x2                          (gate, up)
    GEGLU   in(x) = gelu_tanh(x) * x2
    Q8      x: int8 words, x2: their scales, as a gated decode GEMV leaves them (int8 decode GEMV only)
GEMV layout (`gemv_kernel`, 1-8 tokens): a warp per output row; lane l takes groups of 8 values l, l + 32, ...
of the row, two a step, decodes them once and dots them with every token's activations; then a warp reduction.
Activations are flat float32.

Decode GEMV (`gemv1_kernel`, one token, K <= STAGE): a block of 8 warps writes in(x) once into shared memory
(RMSNorm's 1/rms left out: it scales the dot products), then takes rows in a grid-stride loop, S warps a row
(S = 1..8), each lane a unit of 32 values at a time (a block, or a K-quant sub-block: all of its loads issued
before its arithmetic), partial sums added in shared memory. Rows of 896 values are one unit a lane, so a row
costs one memory round trip. One launch computes up to three products of the same input (rows of weight 1,
then 2, then 3: attention's q, k, v), or, gated (`glu`), rows n of two weights together and
h[n] = act(w1[n] . x) * (w2[n] . x) (SwiGLU / GeGLU). On int8 activations (the default, `_make_gemv1_i8`)
the staged input is then quantized per unit by groups of threads, each lane's unit dot is dp4a on the packed
weight words, and a gated launch gives each warp two rows a step; it can also leave h quantized as those
words (oq, od), so the product reading h (ffn_down, 4864 values for qwen) reads them from global memory instead
of staging and quantizing h in each of its blocks (input mode Q8).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32

from .isa import dp4a
from .jit import SIM, block_sum, device, gelu_tanh, group_isum, group_max, kernel, silu, warp_sum
from .quants import GPU_FORMATS

PLAIN, RMS, SWIGLU, GEGLU, Q8 = range(5)
GEMV_WARPS = 16 if SIM else 4  # rows per block (the simulator pays per block: fewer, larger ones)
HAS_BIAS, HAS_RES, HAS_BIAS2, HAS_BIAS3 = 1, 2, 4, 8
STAGE = 8192  # floats of staged input (32 KB of shared memory): the longest row the decode GEMV takes
WARPS1 = 8  # warps per block of the decode GEMV
BLOCKS_PER_SM = 1 if SIM else 4  # the decode GEMV's grid cap: 4 won the H200 sweep on int8 activations (gate/up
# 12.0 -> 8.9 us, output 67 -> 64 us); the simulator pays per thread: one block


@device
def _input(mode, x, x2, nw, rs, t, K, k):
    if mode == RMS:
        return x[t * K + k] * rs * nw[k]
    if mode == SWIGLU:
        return silu(x[t * K + k]) * x2[t * K + k]
    if mode == GEGLU:
        return gelu_tanh(x[t * K + k]) * x2[t * K + k]
    return x[t * K + k]


_GEMV: dict = {}


def gemv_kernel(type: str, mode: int, nt: int):
    key = (type, mode, nt)
    kern = _GEMV.get(key)
    if kern is None:
        kern = _GEMV[key] = _make_gemv(GPU_FORMATS[type], mode, nt)
        kern._pq_gemv = True  # the backend folds a residual add into the last launch when it is one of these
    return kern


def _make_gemv(fmt, mode, nt):
    dec8, bv = fmt.dec8, fmt.block_values
    gpb = bv // 8

    @kernel
    def gemv(y, z, q, d, x, x2, nw, eps, bias, res, flags, N, K):
        red = cuda.shared.array(32, float32)
        rss = cuda.shared.array(8, float32)
        tid = cuda.threadIdx.x
        lane = tid % 32
        if mode == RMS:
            for t in range(nt):
                s = float32(0.0)
                for k in range(tid, K, cuda.blockDim.x):
                    s += x[t * K + k] * x[t * K + k]
                s = block_sum(red, s)
                if tid == 0:
                    rss[t] = 1.0 / math.sqrt(s / K + eps)
            cuda.syncthreads()
        n = cuda.blockIdx.x * (cuda.blockDim.x // 32) + tid // 32
        nn = min(n, N - 1)
        acc = cuda.local.array(nt, float32)
        v = cuda.local.array(8, float32)
        v2 = cuda.local.array(8, float32)
        for t in range(nt):
            acc[t] = 0.0
        ng = (K // bv) * gpb
        for u in range(lane, ng, 64):  # two groups a step, u and u + 32: their loads go out together
            u2 = min(u + 32, ng - 1)  # past the end: a valid group, weighted 0
            w2 = float32(1.0) if u + 32 < ng else float32(0.0)
            dec8(q, d, nn, u // gpb, u % gpb, v)
            dec8(q, d, nn, u2 // gpb, u2 % gpb, v2)
            k0 = (u // gpb) * bv + 8 * (u % gpb)
            k2 = (u2 // gpb) * bv + 8 * (u2 % gpb)
            for t in range(nt):
                rs = rss[t] if mode == RMS else float32(1.0)
                s = float32(0.0)
                s2 = float32(0.0)
                for i in range(8):
                    s += v[i] * _input(mode, x, x2, nw, rs, t, K, k0 + i)
                    s2 += v2[i] * _input(mode, x, x2, nw, rs, t, K, k2 + i)
                acc[t] += s + w2 * s2
        for t in range(nt):
            s = warp_sum(acc[t])
            if lane == 0 and n < N:
                if flags & HAS_BIAS:
                    s += bias[n]
                y[t * N + n] = s
                if flags & HAS_RES:
                    z[t * N + n] = s + res[t * N + n]

    return gemv


def gemv_grid(n_rows: int) -> tuple[int, int]:
    return (-(-n_rows // GEMV_WARPS), 32 * GEMV_WARPS)


# ---- decode GEMV: one token, up to three weights over one input, or a gated pair ---------------------------

UNIT = 32  # values a lane takes at once: one block (32-value formats) or one sub-block (K-quants)
U32, I32, U64 = np.uint32, np.int32, np.uint64
# Units are straight-line code on 32-bit integers with unsigned indices: numba widens integer arithmetic to
# 64 bits and guards signed indices against wraparound, and the casts let LLVM narrow both away (the PTX of
# a q5_0 unit: 9 instructions a value instead of 30). The staged input of unit u is xs[33u ..], its sum xsum[u].


@device
def _q5_word(w, qh, j0, xs, b):
    """Values j0..j0+3 (low nibbles of w) and j0+16..j0+19 (high), the fifth bit from qh, dotted with xs."""
    s = float32(0.0)
    for i in range(4):
        lo = U32(U32(w >> U32(8 * i)) & U32(15)) | U32(U32(U32(qh >> U32(j0 + i)) & U32(1)) << U32(4))
        hi = U32(U32(w >> U32(8 * i + 4)) & U32(15)) | U32(U32(U32(qh >> U32(j0 + i + 16)) & U32(1)) << U32(4))
        s += (float32(I32(I32(lo) - I32(16))) * xs[b + U64(j0 + i)]
              + float32(I32(I32(hi) - I32(16))) * xs[b + U64(j0 + i + 16)])
    return s


@device
def _unit_q5_0(q, d, n, xs, xsum, u):
    uu, nn = U64(u), U64(n)
    o = U64(5) * uu
    qh, w0, w1, w2, w3 = q[nn, o], q[nn, o + U64(1)], q[nn, o + U64(2)], q[nn, o + U64(3)], q[nn, o + U64(4)]
    b = U64(UNIT + 1) * uu
    s = _q5_word(w0, qh, 0, xs, b) + _q5_word(w1, qh, 4, xs, b) + _q5_word(w2, qh, 8, xs, b)
    return d[nn, uu] * (s + _q5_word(w3, qh, 12, xs, b))


@device
def _i8_word(w, j0, xs, b):
    """The four signed bytes of w dotted with xs[b + j0 ..]."""
    s = float32(0.0)
    for i in range(4):
        s += float32(I32(I32(U32(w << U32(24 - 8 * i))) >> I32(24))) * xs[b + U64(j0 + i)]
    return s


@device
def _unit_q8_0(q, d, n, xs, xsum, u):
    uu, nn = U64(u), U64(n)
    o = U64(8) * uu
    b = U64(UNIT + 1) * uu
    s = (_i8_word(q[nn, o], 0, xs, b) + _i8_word(q[nn, o + U64(1)], 4, xs, b)
         + _i8_word(q[nn, o + U64(2)], 8, xs, b) + _i8_word(q[nn, o + U64(3)], 12, xs, b)
         + _i8_word(q[nn, o + U64(4)], 16, xs, b) + _i8_word(q[nn, o + U64(5)], 20, xs, b)
         + _i8_word(q[nn, o + U64(6)], 24, xs, b) + _i8_word(q[nn, o + U64(7)], 28, xs, b))
    return d[nn, uu] * s


@device
def _nib_word(w, sh, j0, xs, b):
    """The four nibbles at bit sh of each byte of w dotted with xs[b + j0 ..]."""
    s = float32(0.0)
    for i in range(4):
        s += float32(I32(U32(w >> U32(8 * i + sh)) & U32(15))) * xs[b + U64(j0 + i)]
    return s


@device
def _scale_byte(s0, s1, s2, k):
    """Byte k (0..11) of the K-quant scales field held in the words s0, s1, s2."""
    w = s0 if k < 4 else (s1 if k < 8 else s2)
    return U32(U32(w >> U32(8 * (k % 4))) & U32(255))


@device
def _unit_q4_k(q, d, n, xs, xsum, u):
    uu, nn = U64(u), U64(n)
    blk = uu // U64(8)
    j = u % 8  # sub-block: 32 values, the low (even j) or high nibbles of qs bytes 32 (j // 2) ..
    o = U64(35) * blk
    s0, s1, s2 = q[nn, o], q[nn, o + U64(1)], q[nn, o + U64(2)]
    if j < 4:
        sc = U32(_scale_byte(s0, s1, s2, j) & U32(63))
        m = U32(_scale_byte(s0, s1, s2, j + 4) & U32(63))
    else:
        hi = _scale_byte(s0, s1, s2, j + 4)
        sc = U32(hi & U32(15)) | U32(U32(_scale_byte(s0, s1, s2, j - 4) >> U32(6)) << U32(4))
        m = U32(hi >> U32(4)) | U32(U32(_scale_byte(s0, s1, s2, j) >> U32(6)) << U32(4))
    oq = o + U64(3) + U64(8) * U64(j // 2)
    sh = 4 * (j % 2)
    b = U64(UNIT + 1) * uu
    s = (_nib_word(q[nn, oq], sh, 0, xs, b) + _nib_word(q[nn, oq + U64(1)], sh, 4, xs, b)
         + _nib_word(q[nn, oq + U64(2)], sh, 8, xs, b) + _nib_word(q[nn, oq + U64(3)], sh, 12, xs, b)
         + _nib_word(q[nn, oq + U64(4)], sh, 16, xs, b) + _nib_word(q[nn, oq + U64(5)], sh, 20, xs, b)
         + _nib_word(q[nn, oq + U64(6)], sh, 24, xs, b) + _nib_word(q[nn, oq + U64(7)], sh, 28, xs, b))
    return d[nn, U64(2) * blk] * float32(sc) * s - d[nn, U64(2) * blk + U64(1)] * float32(m) * xsum[uu]


@device
def _q6_word(lo, hi, shl, shh, j0, xs, b):
    """Four 6-bit codes (nibbles at bit shl of lo's bytes, 2 bits at shh of hi's) dotted with xs[b + j0 ..]."""
    s = float32(0.0)
    for i in range(4):
        c = U32(U32(lo >> U32(8 * i + shl)) & U32(15)) | U32(U32(U32(hi >> U32(8 * i + shh)) & U32(3)) << U32(4))
        s += float32(I32(c)) * xs[b + U64(j0 + i)]
    return s


@device
def _unit_q6_k(q, d, n, xs, xsum, u):
    uu, nn = U64(u), U64(n)
    blk = uu // U64(8)
    j = u % 8  # values 32j ..: half h = j // 4, quarter k = j % 4
    h, k = j // 4, j % 4
    o = U64(52) * blk
    ol = o + U64(16 * h + 8 * (k % 2))
    oh = o + U64(32 + 8 * h)
    shl, shh = 4 * (k // 2), 2 * k
    b = U64(UNIT + 1) * uu
    sa = (_q6_word(q[nn, ol], q[nn, oh], shl, shh, 0, xs, b)
          + _q6_word(q[nn, ol + U64(1)], q[nn, oh + U64(1)], shl, shh, 4, xs, b)
          + _q6_word(q[nn, ol + U64(2)], q[nn, oh + U64(2)], shl, shh, 8, xs, b)
          + _q6_word(q[nn, ol + U64(3)], q[nn, oh + U64(3)], shl, shh, 12, xs, b))
    sb = (_q6_word(q[nn, ol + U64(4)], q[nn, oh + U64(4)], shl, shh, 16, xs, b)
          + _q6_word(q[nn, ol + U64(5)], q[nn, oh + U64(5)], shl, shh, 20, xs, b)
          + _q6_word(q[nn, ol + U64(6)], q[nn, oh + U64(6)], shl, shh, 24, xs, b)
          + _q6_word(q[nn, ol + U64(7)], q[nn, oh + U64(7)], shl, shh, 28, xs, b))
    ws = q[nn, o + U64(48) + U64(j // 2)]  # the int8 scales of the unit's two halves of 16
    sh = 16 * (j % 2)
    sc_a = float32(I32(I32(U32(ws << U32(24 - sh))) >> I32(24)))
    sc_b = float32(I32(I32(U32(ws << U32(16 - sh))) >> I32(24)))
    # codes are stored + 32: sum (c - 32) x = sum c x - 32 sum x, per half of 16
    xa = float32(0.0)
    for i in range(16):
        xa += xs[b + U64(i)]
    return d[nn, blk] * (sc_a * (sa - float32(32.0) * xa) + sc_b * (sb - float32(32.0) * (xsum[uu] - xa)))


_STRAIGHT = {"q5_0": _unit_q5_0, "q8_0": _unit_q8_0, "q4_k": _unit_q4_k, "q6_k": _unit_q6_k}
_NEEDS_SUM = ("q4_k", "q6_k")  # units that read xsum (mins, code offsets)
_UNIT: dict = {}


def _unit_fn(fmt):
    """unit(q, d, n, xs, xsum, u): values 32u..32u+31 of row n dotted with the staged input xs (xsum: each
    unit's sum)."""
    if fmt.name in _STRAIGHT:
        return _STRAIGHT[fmt.name]
    if fmt.name in _UNIT:
        return _UNIT[fmt.name]
    dec8, upb = fmt.dec8, fmt.block_values // UNIT

    @device
    def unit(q, d, n, xs, xsum, u):  # the other formats through their 8-value decoders
        v = cuda.local.array(8, float32)
        blk = u // upb
        g0 = (u % upb) * 4
        acc = float32(0.0)
        for j in range(4):
            dec8(q, d, n, blk, g0 + j, v)
            s = float32(0.0)
            for i in range(8):
                s += v[i] * xs[(UNIT + 1) * u + 8 * j + i]
            acc += s
        return acc

    _UNIT[fmt.name] = unit
    return unit


# ---- the same units on int8 activations (dp4a) --------------------------------------------------------------
# The input is quantized per unit as Q8_1 is (codes c = rint(v * 127 / max|v|), scale max|v| / 127), staged as
# QW words a unit: 8 words of 4 codes, the sum of the 32 codes, the sum of the first 16 (q6_k's halves), a pad
# word (QW = 11, coprime with the 32 banks: lane l reading unit l never conflicts). A weight word then meets
# an activation word in one dp4a: about one instruction per value where the float units take 5 to 9.
# Each format's unit is split in two: `_ld_*` loads the unit's weight words and scales, `_dt_*` dots them
# with the staged activations, so a gated pair's loads all go out before either dot. Every loader returns the
# same shape (words a, words b, word c, scale d0, scale d1; unused words are 0). (Measured on an H100 and
# dropped: loading each next unit before dotting this one, and the first before staging, cost 10-100 more
# registers a thread and 5-70 % more time; bench/kernels_cuda.py --base compares kernels.)

QW = 11
M4 = U32(0x0F0F0F0F)
Z = U32(0)
F0 = np.float32(0.0)


@device
def _hbits(qh, j):
    """Bits j..j+3 of qh moved to bit 4 of bytes 0..3: q5's fifth bits for one word of nibbles."""
    return U32(U32(U32(U32(qh >> U32(j)) & U32(15)) << U32(4)) * U32(0x00204081)) & U32(0x10101010)


@device
def _dot_nibbles(w0, w1, w2, w3, xq, b):
    """Codes 0..15 in the low then high nibbles of four words (values j and j + 16 in byte j): dot with xq."""
    s = dp4a(w0 & M4, xq[b], I32(0))
    s = dp4a(w1 & M4, xq[b + U64(1)], s)
    s = dp4a(w2 & M4, xq[b + U64(2)], s)
    s = dp4a(w3 & M4, xq[b + U64(3)], s)
    s = dp4a(U32(w0 >> U32(4)) & M4, xq[b + U64(4)], s)
    s = dp4a(U32(w1 >> U32(4)) & M4, xq[b + U64(5)], s)
    s = dp4a(U32(w2 >> U32(4)) & M4, xq[b + U64(6)], s)
    return dp4a(U32(w3 >> U32(4)) & M4, xq[b + U64(7)], s)


@device
def _dot_q5(qh, w0, w1, w2, w3, xq, b):
    s = dp4a(U32(w0 & M4) | _hbits(qh, 0), xq[b], I32(0))
    s = dp4a(U32(w1 & M4) | _hbits(qh, 4), xq[b + U64(1)], s)
    s = dp4a(U32(w2 & M4) | _hbits(qh, 8), xq[b + U64(2)], s)
    s = dp4a(U32(w3 & M4) | _hbits(qh, 12), xq[b + U64(3)], s)
    s = dp4a(U32(U32(w0 >> U32(4)) & M4) | _hbits(qh, 16), xq[b + U64(4)], s)
    s = dp4a(U32(U32(w1 >> U32(4)) & M4) | _hbits(qh, 20), xq[b + U64(5)], s)
    s = dp4a(U32(U32(w2 >> U32(4)) & M4) | _hbits(qh, 24), xq[b + U64(6)], s)
    return dp4a(U32(U32(w3 >> U32(4)) & M4) | _hbits(qh, 28), xq[b + U64(7)], s)


@device
def _dot8(a, xq, b):
    """The eight words of a (four int8 each) dotted with xq[b ..]."""
    s = dp4a(a[0], xq[b], I32(0))
    s = dp4a(a[1], xq[b + U64(1)], s)
    s = dp4a(a[2], xq[b + U64(2)], s)
    s = dp4a(a[3], xq[b + U64(3)], s)
    s = dp4a(a[4], xq[b + U64(4)], s)
    s = dp4a(a[5], xq[b + U64(5)], s)
    s = dp4a(a[6], xq[b + U64(6)], s)
    return dp4a(a[7], xq[b + U64(7)], s)


@device
def _ld4(q, nn, o):
    return (q[nn, o], q[nn, o + U64(1)], q[nn, o + U64(2)], q[nn, o + U64(3)], Z, Z, Z, Z)


@device
def _ld8(q, nn, o):
    return (q[nn, o], q[nn, o + U64(1)], q[nn, o + U64(2)], q[nn, o + U64(3)],
            q[nn, o + U64(4)], q[nn, o + U64(5)], q[nn, o + U64(6)], q[nn, o + U64(7)])


@device
def _ld_q4_0(q, d, n, u):
    uu, nn = U64(u), U64(n)
    return _ld4(q, nn, U64(4) * uu), (Z, Z, Z, Z, Z, Z, Z, Z), Z, d[nn, uu], F0


@device
def _dt_q4_0(w, xq, xd, u):
    a = w[0]
    b = U64(QW) * U64(u)
    s = _dot_nibbles(a[0], a[1], a[2], a[3], xq, b)
    return w[3] * xd[u] * float32(I32(s - I32(8) * xq[b + U64(8)]))


@device
def _ld_q4_1(q, d, n, u):
    uu, nn = U64(u), U64(n)
    return _ld4(q, nn, U64(4) * uu), (Z, Z, Z, Z, Z, Z, Z, Z), Z, d[nn, U64(2) * uu], d[nn, U64(2) * uu + U64(1)]


@device
def _dt_q4_1(w, xq, xd, u):
    a = w[0]
    b = U64(QW) * U64(u)
    s = _dot_nibbles(a[0], a[1], a[2], a[3], xq, b)
    return xd[u] * (w[3] * float32(s) + w[4] * float32(xq[b + U64(8)]))


@device
def _ld5(q, nn, o):
    return (q[nn, o], q[nn, o + U64(1)], q[nn, o + U64(2)], q[nn, o + U64(3)], q[nn, o + U64(4)], Z, Z, Z)


@device
def _ld_q5_0(q, d, n, u):
    uu, nn = U64(u), U64(n)
    return _ld5(q, nn, U64(5) * uu), (Z, Z, Z, Z, Z, Z, Z, Z), Z, d[nn, uu], F0


@device
def _dt_q5_0(w, xq, xd, u):
    a = w[0]
    b = U64(QW) * U64(u)
    s = _dot_q5(a[0], a[1], a[2], a[3], a[4], xq, b)
    return w[3] * xd[u] * float32(I32(s - I32(16) * xq[b + U64(8)]))


@device
def _ld_q5_1(q, d, n, u):
    uu, nn = U64(u), U64(n)
    return _ld5(q, nn, U64(5) * uu), (Z, Z, Z, Z, Z, Z, Z, Z), Z, d[nn, U64(2) * uu], d[nn, U64(2) * uu + U64(1)]


@device
def _dt_q5_1(w, xq, xd, u):
    a = w[0]
    b = U64(QW) * U64(u)
    s = _dot_q5(a[0], a[1], a[2], a[3], a[4], xq, b)
    return xd[u] * (w[3] * float32(s) + w[4] * float32(xq[b + U64(8)]))


@device
def _ld_q8_0(q, d, n, u):
    uu, nn = U64(u), U64(n)
    return _ld8(q, nn, U64(8) * uu), (Z, Z, Z, Z, Z, Z, Z, Z), Z, d[nn, uu], F0


@device
def _dt_q8_0(w, xq, xd, u):
    return w[3] * xd[u] * float32(_dot8(w[0], xq, U64(QW) * U64(u)))


@device
def _ld_q4_k(q, d, n, u):
    uu, nn = U64(u), U64(n)
    blk = uu // U64(8)
    o = U64(35) * blk
    qs = _ld8(q, nn, o + U64(3) + U64(8) * U64((u % 8) // 2))
    return qs, (q[nn, o], q[nn, o + U64(1)], q[nn, o + U64(2)], Z, Z, Z, Z, Z), Z, d[nn, U64(2) * blk], \
        d[nn, U64(2) * blk + U64(1)]


@device
def _dt_q4_k(w, xq, xd, u):
    a, sw = w[0], w[1]
    s0, s1, s2 = sw[0], sw[1], sw[2]
    j = u % 8  # sub-block: 32 values, the low (even j) or high nibbles of qs bytes 32 (j // 2) ..
    if j < 4:
        sc = U32(_scale_byte(s0, s1, s2, j) & U32(63))
        m = U32(_scale_byte(s0, s1, s2, j + 4) & U32(63))
    else:
        hi = _scale_byte(s0, s1, s2, j + 4)
        sc = U32(hi & U32(15)) | U32(U32(_scale_byte(s0, s1, s2, j - 4) >> U32(6)) << U32(4))
        m = U32(hi >> U32(4)) | U32(U32(_scale_byte(s0, s1, s2, j) >> U32(6)) << U32(4))
    sh = U32(4 * (j % 2))
    b = U64(QW) * U64(u)
    s = dp4a(U32(a[0] >> sh) & M4, xq[b], I32(0))
    s = dp4a(U32(a[1] >> sh) & M4, xq[b + U64(1)], s)
    s = dp4a(U32(a[2] >> sh) & M4, xq[b + U64(2)], s)
    s = dp4a(U32(a[3] >> sh) & M4, xq[b + U64(3)], s)
    s = dp4a(U32(a[4] >> sh) & M4, xq[b + U64(4)], s)
    s = dp4a(U32(a[5] >> sh) & M4, xq[b + U64(5)], s)
    s = dp4a(U32(a[6] >> sh) & M4, xq[b + U64(6)], s)
    s = dp4a(U32(a[7] >> sh) & M4, xq[b + U64(7)], s)
    return xd[u] * (w[3] * float32(sc) * float32(s) - w[4] * float32(m) * float32(xq[b + U64(8)]))


@device
def _q6_codes(lo, hi, shl, shh):
    return U32(U32(lo >> shl) & M4) | U32(U32(U32(hi >> shh) & U32(0x03030303)) << U32(4))


@device
def _ld_q6_k(q, d, n, u):
    uu, nn = U64(u), U64(n)
    blk = uu // U64(8)
    j = u % 8  # values 32j ..: half h = j // 4, quarter k = j % 4
    h, k = j // 4, j % 4
    o = U64(52) * blk
    lo = _ld8(q, nn, o + U64(16 * h + 8 * (k % 2)))
    hi = _ld8(q, nn, o + U64(32 + 8 * h))
    return lo, hi, q[nn, o + U64(48) + U64(j // 2)], d[nn, blk], F0  # c: the int8 scales of two halves of 16


@device
def _dt_q6_k(w, xq, xd, u):
    lo, hi, ws = w[0], w[1], w[2]
    j = u % 8
    k = j % 4
    shl, shh = U32(4 * (k // 2)), U32(2 * k)
    b = U64(QW) * U64(u)
    sa = dp4a(_q6_codes(lo[0], hi[0], shl, shh), xq[b], I32(0))
    sa = dp4a(_q6_codes(lo[1], hi[1], shl, shh), xq[b + U64(1)], sa)
    sa = dp4a(_q6_codes(lo[2], hi[2], shl, shh), xq[b + U64(2)], sa)
    sa = dp4a(_q6_codes(lo[3], hi[3], shl, shh), xq[b + U64(3)], sa)
    sb = dp4a(_q6_codes(lo[4], hi[4], shl, shh), xq[b + U64(4)], I32(0))
    sb = dp4a(_q6_codes(lo[5], hi[5], shl, shh), xq[b + U64(5)], sb)
    sb = dp4a(_q6_codes(lo[6], hi[6], shl, shh), xq[b + U64(6)], sb)
    sb = dp4a(_q6_codes(lo[7], hi[7], shl, shh), xq[b + U64(7)], sb)
    sh = 16 * (j % 2)
    sc_a = I32(I32(U32(ws << U32(24 - sh))) >> I32(24))
    sc_b = I32(I32(U32(ws << U32(16 - sh))) >> I32(24))
    ha = xq[b + U64(9)]  # codes are stored + 32: sum (c - 32) x = sum c x - 32 sum x, per half of 16
    hb = I32(xq[b + U64(8)] - ha)
    return w[3] * xd[u] * float32(I32(sc_a * I32(sa - I32(32) * ha) + sc_b * I32(sb - I32(32) * hb)))


INT_UNITS = {"q4_0": (_ld_q4_0, _dt_q4_0), "q4_1": (_ld_q4_1, _dt_q4_1), "q5_0": (_ld_q5_0, _dt_q5_0),
             "q5_1": (_ld_q5_1, _dt_q5_1), "q8_0": (_ld_q8_0, _dt_q8_0), "q4_k": (_ld_q4_k, _dt_q4_k),
             "q6_k": (_ld_q6_k, _dt_q6_k)}


def stage_units(K: int) -> int:
    """Units of staged input a decode GEMV kernel holds (its shared array is sized at compile time)."""
    u = 32
    while u * UNIT < K:
        u *= 2
    return u


_GEMV1: dict = {}


def gemv1_kernel(types: tuple, mode: int, glu: int, K: int, int8: bool = True):
    """The decode GEMV over weights of `types` (1-3), input `mode`, gated by `glu` (0, SWIGLU or GEGLU), for
    rows of K values (K <= STAGE); on int8 activations (dp4a) when `int8` and every type has an int8 unit."""
    int8 = bool(int8) and all(t in INT_UNITS for t in types)
    key = (types, mode, glu, stage_units(K), int8)
    kern = _GEMV1.get(key)
    if kern is None:
        fmts = tuple(GPU_FORMATS[t] for t in types)
        fmts = (fmts + (fmts[0],) * 2)[:3]
        kern = _GEMV1[key] = (_make_gemv1_i8 if int8 else _make_gemv1)(fmts, mode, glu, key[3])
    return kern


@device
def _stage_value(mode, x, x2, nw, k):
    """in(x)[k] without RMSNorm's 1/rms (it scales the dot products instead), and x[k] (for the sum of squares)."""
    xv = x[k]
    if mode == RMS:
        return xv * nw[k], xv
    if mode == SWIGLU:
        return silu(xv) * x2[k], xv
    if mode == GEGLU:
        return gelu_tanh(xv) * x2[k], xv
    return xv, xv


@device
def _stage_input(mode, x, x2, nw, xs, K):
    """in(x) into xs, a padding word after each unit of 32 (lane l reading unit l, or the quantizing threads,
    never conflict); returns this thread's part of sum(x^2). One pass over x, four loads a thread a step
    (clamped in range, stored only when in range) so they are in flight together."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    ssq = float32(0.0)
    for k0 in range(tid, K, 4 * nt):
        for j in range(4):
            k = k0 + j * nt
            val, xv = _stage_value(mode, x, x2, nw, min(k, K - 1))
            if k < K:
                ssq += xv * xv
                xs[k + k // UNIT] = val
    return ssq


def _make_gemv1(fmts, mode, glu, units):
    unit1, unit2, unit3 = (_unit_fn(f) for f in fmts)
    need_sum = any(f.name in _NEEDS_SUM for f in fmts)
    n_stage = (UNIT + 1) * units  # one padding word a unit: lane l reading unit l hits bank l + i

    @kernel
    def gemv1(y1, y2, y3, q1, d1, q2, d2, q3, d3, b1, b2, b3, x, x2, nw, eps, res, z, flags, n1, n2, n3, K, oq, od,
              cnt, S):
        xs = cuda.shared.array(n_stage, float32)
        xsum = cuda.shared.array(units, float32)
        red = cuda.shared.array(32, float32)
        pa = cuda.shared.array(WARPS1, float32)
        pb = cuda.shared.array(WARPS1, float32)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        ssq = _stage_input(mode, x, x2, nw, xs, K)
        if need_sum:  # each unit's sum, a thread a unit
            cuda.syncthreads()
            for uq in range(tid, K // UNIT, nt):
                t = float32(0.0)
                for i in range(UNIT):
                    t += xs[(UNIT + 1) * uq + i]
                xsum[uq] = t
        rs = float32(1.0)
        if mode == RMS:
            rs = 1.0 / math.sqrt(block_sum(red, ssq) / K + eps)
        cuda.syncthreads()
        warp, lane, sub, per, rows = _row_layout(glu, S, n1, n2, n3)
        nu = K // UNIT
        u0 = sub * 32 + lane
        step = 32 * S
        for it in range(cuda.blockIdx.x, (rows + per - 1) // per, cuda.gridDim.x):
            r = it * per + warp // S
            rr = min(r, rows - 1)
            a = float32(0.0)
            b = float32(0.0)
            if glu:
                for u in range(u0, nu, step):  # both weights' loads in one iteration
                    a += unit1(q1, d1, rr, xs, xsum, u)
                    b += unit2(q2, d2, rr, xs, xsum, u)
            elif rr < n1:
                for u in range(u0, nu, step):
                    a += unit1(q1, d1, rr, xs, xsum, u)
            elif rr < n1 + n2:
                for u in range(u0, nu, step):
                    a += unit2(q2, d2, rr - n1, xs, xsum, u)
            else:
                for u in range(u0, nu, step):
                    a += unit3(q3, d3, rr - n1 - n2, xs, xsum, u)
            a, b = _row_sums(a, b, glu, S, pa, pb, warp, sub, lane)
            if sub == 0 and lane == 0 and r < rows:
                _gemv1_out(glu, y1, y2, y3, b1, b2, b3, res, z, flags, n1, n2, r, a * rs, b * rs)

    return gemv1


@device
def _row_layout(glu, S, n1, n2, n3):
    """(warp, lane, the warp's place among its row's S warps, rows a block takes a step, rows)."""
    warp = cuda.threadIdx.x // 32
    return warp, cuda.threadIdx.x % 32, warp % S, (cuda.blockDim.x // 32) // S, n1 if glu else n1 + n2 + n3


@device
def _row_sums(a, b, glu, S, pa, pb, warp, sub, lane):
    """A row's partial sums over its S warps (every thread of the block calls this as often)."""
    a = warp_sum(a)
    if glu:
        b = warp_sum(b)
    if S > 1:
        if lane == 0:
            pa[warp] = a
            pb[warp] = b
        cuda.syncthreads()
        a = float32(0.0)
        b = float32(0.0)
        for j in range(S):
            a += pa[warp - sub + j]
            b += pb[warp - sub + j]
        cuda.syncthreads()
    return a, b


def _make_q8_unit(g: int):
    """A device function quantizing one unit of 32 values as the int8 GEMV reads it, g threads a unit (32 / g
    values a thread): codes rint(v * 127 / max|v|) (half to even, as Q8_0's x86 quantizer) packed 4 a word into
    xq[QW u .. QW u + 7], the codes' sum and their first half's sum into xq[QW u + 8], xq[QW u + 9], the scale
    max|v| / 127 into xd[u]. Every thread of the block calls it alike (the group reductions are warp-wide, and
    block-wide in the simulator); only those with `store` write."""
    vpt = UNIT // g

    @device
    def q8_unit(src, o, i0, xq, xd, u, store):
        amax = float32(0.0)
        for i in range(vpt):
            amax = max(amax, abs(src[o + i]))
        amax = group_max(amax, g)
        inv = float32(127.0) / amax if amax > float32(0.0) else float32(0.0)
        tot = I32(0)
        half = I32(0)
        for wi in range(vpt // 4):
            word = U32(0)
            for j in range(4):
                c = I32(round(src[o + 4 * wi + j] * inv))
                tot += c
                if i0 + 4 * wi + j < 16:
                    half += c
                word |= U32(U32(c) & U32(255)) << U32(8 * j)
            if store:
                xq[QW * u + i0 // 4 + wi] = I32(word)
        tot = group_isum(tot, g)
        half = group_isum(half, g)
        if store and i0 == 0:
            xq[QW * u + 8] = tot
            xq[QW * u + 9] = half
            xd[u] = amax / float32(127.0)

    return q8_unit


def _make_gemv1_i8(fmts, mode, glu, units):
    """The decode GEMV on int8 activations: the float kernel's staging and row loop, the staged input then
    quantized by groups of g threads a unit (vpt values a thread, the unit's max and code sums reduced over the
    group's lanes), so a short row's few units do not leave most of the block idle while one thread a unit
    quantizes 32 values serially. Mode Q8 takes the input already quantized (x: the words, x2: the scales, as
    a gated launch leaves them in oq, od) and reads it from global memory, with nothing staged. A gated launch
    quantizes its output h for the product that reads it: after each step's rows (a run of whole 32-row units,
    the rows a multiple of 32) the block adds them to cnt[unit], and the block that completes a unit quantizes
    it into oq, od and zeroes its count (oq of size 1: off)."""
    (ld1, dt1), (ld2, dt2), (ld3, dt3) = (INT_UNITS[f.name] for f in fmts)
    n_xs, n_q = (UNIT + 1) * units, QW * units  # shared array sizes must be literals
    g = max(1, min(8, 256 // units))  # threads a unit: one pass of at most 256 threads over the longest row
    vpt = UNIT // g  # values a thread quantizes
    rpw = 2 if glu else 1  # rows a warp takes a step: a gated pair's four loads a lane go out together
    q8_unit = _make_q8_unit(g)
    q8_out = _make_q8_unit(8)  # a gated launch's output unit, 8 threads
    staged = mode != Q8

    @kernel
    def gemv1(y1, y2, y3, q1, d1, q2, d2, q3, d3, b1, b2, b3, x, x2, nw, eps, res, z, flags, n1, n2, n3, K, oq, od,
              cnt, S):
        red = cuda.shared.array(32, float32)
        pa = cuda.shared.array(WARPS1, float32)
        pb = cuda.shared.array(WARPS1, float32)
        last = cuda.shared.array(1, int32)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        nu = K // UNIT
        ssq = float32(0.0)
        if staged:
            xs = cuda.shared.array(n_xs, float32)
            xd = cuda.shared.array(units, float32)
            xq = cuda.shared.array(n_q, int32)
            ssq = _stage_input(mode, x, x2, nw, xs, K)
            cuda.syncthreads()
            for p0 in range(0, nu * g, nt):  # every thread takes the same number of passes
                sl = p0 + tid
                if g == 1 and not SIM and sl >= nu:  # no group reduction to join: threads past the last unit idle
                    continue
                uq = min(sl // g, nu - 1)
                i0 = vpt * (sl % g)
                q8_unit(xs, (UNIT + 1) * uq + i0, i0, xq, xd, uq, sl < nu * g)
        else:
            xq = x
            xd = x2
        rs = float32(1.0)
        if mode == RMS:
            rs = 1.0 / math.sqrt(block_sum(red, ssq) / K + eps)
        if staged:
            cuda.syncthreads()
        warp, lane, sub, per, rows = _row_layout(glu, S, n1, n2, n3)
        u0 = sub * 32 + lane
        step = 32 * S
        for it in range(cuda.blockIdx.x, (rows + rpw * per - 1) // (rpw * per), cuda.gridDim.x):
            r = it * rpw * per + warp // S
            rr = min(r, rows - 1)
            a = float32(0.0)
            b = float32(0.0)
            if glu:  # rows r and r + per: both weights' loads of both rows in one iteration
                r2 = r + per
                rr2 = min(r2, rows - 1)
                an = float32(0.0)
                bn = float32(0.0)
                for u in range(u0, nu, step):
                    wa = ld1(q1, d1, rr, u)
                    wb = ld2(q2, d2, rr, u)
                    wa2 = ld1(q1, d1, rr2, u)
                    wb2 = ld2(q2, d2, rr2, u)
                    a += dt1(wa, xq, xd, u)
                    b += dt2(wb, xq, xd, u)
                    an += dt1(wa2, xq, xd, u)
                    bn += dt2(wb2, xq, xd, u)
                an, bn = _row_sums(an, bn, glu, S, pa, pb, warp, sub, lane)
                if sub == 0 and lane == 0 and r2 < rows:
                    _gemv1_out(glu, y1, y2, y3, b1, b2, b3, res, z, flags, n1, n2, r2, an * rs, bn * rs)
            elif rr < n1:
                for u in range(u0, nu, step):
                    a += dt1(ld1(q1, d1, rr, u), xq, xd, u)
            elif rr < n1 + n2:
                for u in range(u0, nu, step):
                    a += dt2(ld2(q2, d2, rr - n1, u), xq, xd, u)
            else:
                for u in range(u0, nu, step):
                    a += dt3(ld3(q3, d3, rr - n1 - n2, u), xq, xd, u)
            a, b = _row_sums(a, b, glu, S, pa, pb, warp, sub, lane)
            if sub == 0 and lane == 0 and r < rows:
                _gemv1_out(glu, y1, y2, y3, b1, b2, b3, res, z, flags, n1, n2, r, a * rs, b * rs)
            if glu and oq.size > 1:  # this step's rows of h written: count them into their unit
                cuda.threadfence()
                cuda.syncthreads()
                hu = (it * rpw * per) // UNIT
                if tid == 0:
                    last[0] = 1 if cuda.atomic.add(cnt, hu, rpw * per) == UNIT - rpw * per else 0
                cuda.syncthreads()
                if last[0] == 1:  # the unit's other rows are in: quantize it (8 threads), reset its count
                    i0 = 4 * (tid % 8)
                    q8_out(y3, UNIT * hu + i0, i0, oq, od, hu, tid < 8)
                    if tid == 0:
                        cnt[hu] = 0

    gemv1._pq_rows_per_warp = rpw  # gemv1_launch's `rows_per_warp`
    return gemv1


@device
def _gemv1_out(glu, y1, y2, y3, b1, b2, b3, res, z, flags, n1, n2, r, a, b):
    if glu:
        if flags & HAS_BIAS:
            a += b1[r]
        if flags & HAS_BIAS2:
            b += b2[r]
        y1[r] = a
        y2[r] = b
        y3[r] = (silu(a) if glu == SWIGLU else gelu_tanh(a)) * b
    elif r < n1:
        if flags & HAS_BIAS:
            a += b1[r]
        y1[r] = a
        if flags & HAS_RES:
            z[r] = a + res[r]
    elif r < n1 + n2:
        if flags & HAS_BIAS2:
            a += b2[r - n1]
        y2[r - n1] = a
    else:
        if flags & HAS_BIAS3:
            a += b3[r - n1 - n2]
        y3[r - n1 - n2] = a


def gemv1_launch(rows: int, K: int, n_sm: int, blocks_per_sm: int = BLOCKS_PER_SM,
                 split: int | None = None, rows_per_warp: int = 1) -> tuple[int, int, int]:
    """(grid, block, S) of the decode GEMV: S warps a row while the rows give under 8 warps an SM and a lane
    still has a unit of 32 values (more warps a row measured slower for 896 rows of 4864: each block stages
    the whole input); the grid covers the rows in one step up to `blocks_per_sm` blocks an SM, which then
    loop. A kernel whose warps take two rows a step (the int8 gated pair) says so in `_pq_rows_per_warp`.
    The same rule serves an input quantized beforehand (mode Q8), though a block then stages nothing: on an
    H100, qwen's ffn_down on a Q8 input took 6.1 us (q6_k) / 5.8 (q4_k) at the rule's S = 2, and 9.0 / 8.9 at
    S = 8, a unit a lane. (bench/kernels_cuda.py sweeps blocks_per_sm and split.)"""
    rows = -(-rows // rows_per_warp)
    nu, s = K // UNIT, 1
    while s < WARPS1 and rows * s < 8 * n_sm and nu > 32 * s:
        s *= 2
    s = split or s
    per = WARPS1 // s  # rows a block takes a step; a block of S x per warps (S need not divide 8)
    return min(-(-rows // per), blocks_per_sm * n_sm), 32 * s * per, s


def q8_words(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (K,) quantized as the int8 decode GEMV's units (numpy, the oracle of `_make_q8_unit`): words int32
    (K/32 * QW; a unit's 8 words of codes, their sum, their first 16's sum, a pad) and scales float32 (K/32), the
    layout a gated launch leaves in oq, od."""
    b = np.asarray(x, np.float32).reshape(-1, UNIT)
    amax = np.abs(b).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    codes = np.rint(b * inv[:, None]).astype(np.int32)
    words = np.zeros((len(b), QW), np.int32)
    words[:, :8] = codes.astype(np.int8).view(np.int32)
    words[:, 8], words[:, 9] = codes.sum(axis=1), codes[:, :16].sum(axis=1)
    return words.reshape(-1), (amax / np.float32(127)).astype(np.float32)


# ---- float GEMM for many tokens (formats without int8 codes, or int8 prefill off) -------------------------

TILE = 64
_GEMM: dict = {}


def gemm_f32_kernel(type: str):
    if type not in _GEMM:
        _GEMM[type] = _make_gemm(GPU_FORMATS[type])
    return _GEMM[type]


def _make_gemm(fmt):
    dec8, bv = fmt.dec8, fmt.block_values

    @kernel
    def gemm(y, q, d, x, bias, res, flags, T, N, K):
        sx = cuda.shared.array((TILE, 33), float32)
        sw = cuda.shared.array((TILE, 33), float32)
        tid = cuda.threadIdx.x
        tx = tid % 16
        ty = tid // 16
        t0 = cuda.blockIdx.y * TILE
        n0 = cuda.blockIdx.x * TILE
        acc = cuda.local.array(16, float32)
        a = cuda.local.array(4, float32)
        b = cuda.local.array(4, float32)
        v = cuda.local.array(8, float32)
        for i in range(16):
            acc[i] = 0.0
        for kb in range(0, K, 32):
            for i in range(8):
                idx = tid + 256 * i
                r = idx // 32
                c = idx % 32
                t = t0 + r
                sx[r, c] = x[t * K + kb + c] if t < T else float32(0.0)
            r = tid // 4
            g4 = tid % 4
            dec8(q, d, min(n0 + r, N - 1), kb // bv, (kb % bv) // 8 + g4, v)
            for i in range(8):
                sw[r, 8 * g4 + i] = v[i]
            cuda.syncthreads()
            for c in range(32):
                for i in range(4):
                    a[i] = sx[ty * 4 + i, c]
                    b[i] = sw[tx * 4 + i, c]
                for i in range(4):
                    for j in range(4):
                        acc[4 * i + j] += a[i] * b[j]
            cuda.syncthreads()
        for i in range(4):
            t = t0 + ty * 4 + i
            for j in range(4):
                n = n0 + tx * 4 + j
                if t < T and n < N:
                    s = acc[4 * i + j]
                    if flags & HAS_BIAS:
                        s += bias[n]
                    if flags & HAS_RES:
                        s += res[t * N + n]
                    y[t * N + n] = s

    return gemm


def gemm_grid(T: int, N: int):
    return (-(-N // TILE), -(-T // TILE)), 256


# ---- embedding rows ---------------------------------------------------------------------------------------

_ROWS: dict = {}


def get_rows_kernel(type: str):
    if type not in _ROWS:
        _ROWS[type] = _make_get_rows(GPU_FORMATS[type])
    return _ROWS[type]


def _make_get_rows(fmt):
    dec8, bv = fmt.dec8, fmt.block_values
    gpb = bv // 8

    @kernel
    def get_rows(y, q, d, params, ids_at, scale, K):
        """y[t, :] = scale * w[params[ids_at + t], :]; grid (T, K/8/128)."""
        t = cuda.blockIdx.x
        u = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if u < K // 8:
            v = cuda.local.array(8, float32)
            dec8(q, d, params[ids_at + t], u // gpb, u % gpb, v)
            for i in range(8):
                y[t * K + 8 * u + i] = v[i] * scale

    return get_rows


def rows_grid(T: int, K: int):
    return (T, -(-(K // 8) // 128)), 128


def np_f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32)
