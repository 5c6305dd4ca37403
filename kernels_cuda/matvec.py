"""Products with packed weights: the dequantizing GEMV of decode, its float GEMM sibling for longer inputs,
and the embedding row gather. One kernel per (format, input mode, tokens), built on first use.

    y[t, n] = sum_k w[n, k] * in(x)[t, k] (+ bias[n]);  z[t, n] = y[t, n] + res[t, n] when HAS_RES

Input modes fuse the op that produced the activation into the product, so decode reads it once:
    PLAIN   in(x) = x
    RMS     in(x) = x * rsqrt(mean(x^2) + eps) * nw      (RMSNorm, computed per block from x)
    SWIGLU  in(x) = silu(x) * x2                          (gate, up)
    GEGLU   in(x) = gelu_tanh(x) * x2
GEMV layout: a warp per output row; lane l takes groups of 8 values l, l + 32, ... of the row, two a step,
decodes them once and dots them with every token's activations; then a warp reduction. Activations are flat float32.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from .jit import SIM, block_sum, device, gelu_tanh, kernel, silu, warp_sum
from .quants import GPU_FORMATS

PLAIN, RMS, SWIGLU, GEGLU = range(4)
GEMV_WARPS = 16 if SIM else 4  # rows per block (the simulator pays per block: fewer, larger ones)
HAS_BIAS, HAS_RES = 1, 2


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
