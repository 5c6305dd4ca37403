"""Products with packed weights: the dequantizing GEMV of decode, its float GEMM sibling for longer inputs,
and the embedding row gather. One kernel per (format, input mode, tokens), built on first use.

    y[t, n] = sum_k w[n, k] * in(x)[t, k] (+ bias[n]);  z[t, n] = y[t, n] + res[t, n] when HAS_RES

Input modes fuse the op that produced the activation into the product, so decode reads it once:
    PLAIN   in(x) = x
    RMS     in(x) = x * rsqrt(mean(x^2) + eps) * nw      (RMSNorm, computed per block from x)
    SWIGLU  in(x) = silu(x) * x2                          (gate, up)
    GEGLU   in(x) = gelu_tanh(x) * x2
GEMV layout (`gemv_kernel`, 1-8 tokens): a warp per output row; lane l takes groups of 8 values l, l + 32, ...
of the row, two a step, decodes them once and dots them with every token's activations; then a warp reduction.
Activations are flat float32.

Decode GEMV (`gemv1_kernel`, one token, K <= STAGE): a block of 8 warps writes in(x) once into shared memory
(value 8u + i at i * K/8 + u, so the lanes of a warp read consecutive words), then takes rows in a grid-stride
loop, S warps a row (S = 1..8, each a share of the row's groups, partial sums added in shared memory). One
launch computes up to three products of the same input (rows of weight 1, then 2, then 3: attention's q, k, v),
or, gated (`glu`), rows n of two weights together and h[n] = act(w1[n] . x) * (w2[n] . x) (SwiGLU / GeGLU).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from .jit import SIM, block_sum, device, gelu_tanh, kernel, silu, warp_sum
from .quants import GPU_FORMATS

PLAIN, RMS, SWIGLU, GEGLU = range(4)
GEMV_WARPS = 16 if SIM else 4  # rows per block (the simulator pays per block: fewer, larger ones)
HAS_BIAS, HAS_RES, HAS_BIAS2, HAS_BIAS3 = 1, 2, 4, 8
STAGE = 8192  # floats of staged input (32 KB of shared memory): the longest row the decode GEMV takes
WARPS1 = 8  # warps per block of the decode GEMV
BLOCKS_PER_SM = 1 if SIM else 4  # the decode GEMV's grid (the simulator pays per thread: one block)


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

_DOT: dict = {}


def _dot_fn(fmt):
    """dot(q, d, n, xs, ng, u0, step): row n's groups u0, u0 + step, ... dotted with the staged input."""
    if fmt.name in _DOT:
        return _DOT[fmt.name]
    dec8, gpb = fmt.dec8, fmt.block_values // 8

    @device
    def dot(q, d, n, xs, ng, u0, step):
        v = cuda.local.array(8, float32)
        v2 = cuda.local.array(8, float32)
        acc = float32(0.0)
        for u in range(u0, ng, 2 * step):  # two groups a step: their loads go out together
            u2 = min(u + step, ng - 1)  # past the end: a valid group, weighted 0
            w2 = float32(1.0) if u + step < ng else float32(0.0)
            dec8(q, d, n, u // gpb, u % gpb, v)
            dec8(q, d, n, u2 // gpb, u2 % gpb, v2)
            s = float32(0.0)
            s2 = float32(0.0)
            for i in range(8):
                s += v[i] * xs[i * ng + u]
                s2 += v2[i] * xs[i * ng + u2]
            acc += s + w2 * s2
        return acc

    _DOT[fmt.name] = dot
    return dot


_GEMV1: dict = {}


def gemv1_kernel(types: tuple, mode: int, glu: int):
    """The decode GEMV over weights of `types` (1-3), input `mode`, gated by `glu` (0, SWIGLU or GEGLU)."""
    key = (types, mode, glu)
    kern = _GEMV1.get(key)
    if kern is None:
        fmts = tuple(GPU_FORMATS[t] for t in types)
        kern = _GEMV1[key] = _make_gemv1((fmts + (fmts[0],) * 2)[:3], mode, glu)
    return kern


def _make_gemv1(fmts, mode, glu):
    dot1, dot2, dot3 = (_dot_fn(f) for f in fmts)

    @kernel
    def gemv1(y1, y2, y3, q1, d1, q2, d2, q3, d3, b1, b2, b3, x, x2, nw, eps, res, z, flags, n1, n2, n3, K, S):
        xs = cuda.shared.array(STAGE, float32)
        red = cuda.shared.array(32, float32)
        pa = cuda.shared.array(WARPS1, float32)
        pb = cuda.shared.array(WARPS1, float32)
        tid = cuda.threadIdx.x
        ng = K // 8
        rs = float32(1.0)
        if mode == RMS:
            s = float32(0.0)
            for k in range(tid, K, cuda.blockDim.x):
                s += x[k] * x[k]
            s = block_sum(red, s)
            rs = 1.0 / math.sqrt(s / K + eps)
        for k in range(tid, K, cuda.blockDim.x):
            xs[(k % 8) * ng + k // 8] = _input(mode, x, x2, nw, rs, 0, K, k)
        cuda.syncthreads()
        warp = tid // 32
        lane = tid % 32
        sub = warp % S
        per = (cuda.blockDim.x // 32) // S  # rows a block takes a step
        rows = n1 if glu else n1 + n2 + n3
        u0 = sub * 32 + lane
        for it in range(cuda.blockIdx.x, (rows + per - 1) // per, cuda.gridDim.x):
            r = it * per + warp // S
            rr = min(r, rows - 1)
            b = float32(0.0)
            if glu:
                a = dot1(q1, d1, rr, xs, ng, u0, 32 * S)
                b = dot2(q2, d2, rr, xs, ng, u0, 32 * S)
            elif rr < n1:
                a = dot1(q1, d1, rr, xs, ng, u0, 32 * S)
            elif rr < n1 + n2:
                a = dot2(q2, d2, rr - n1, xs, ng, u0, 32 * S)
            else:
                a = dot3(q3, d3, rr - n1 - n2, xs, ng, u0, 32 * S)
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
            if sub == 0 and lane == 0 and r < rows:
                _gemv1_out(glu, y1, y2, y3, b1, b2, b3, res, z, flags, n1, n2, r, a, b)

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
                 split: int | None = None) -> tuple[int, int, int]:
    """(grid, block, S) of the decode GEMV: S warps a row, more while a lane would take over 4 groups of 8, or
    while the rows give under 16 warps an SM (and a lane still takes 2 groups); the grid a few blocks an SM.
    (bench/kernels_cuda.py sweeps blocks_per_sm and split.)"""
    ng, s = K // 8, 1
    while s < WARPS1 and (ng > 128 * s or (rows * s < 16 * n_sm and ng > 64 * s)):
        s *= 2
    s = split or s
    per = WARPS1 // s
    return min(-(-rows // per), blocks_per_sm * n_sm), 32 * WARPS1, s


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
