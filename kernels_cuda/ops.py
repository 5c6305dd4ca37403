"""Elementwise and row ops on flat float32 activations: RMSNorm (alone, or with the residual add after it),
RoPE, SiLU/GELU gates, add, scale.

Positions come from the device parameter block (`params[POS0]`, written once per flush by the backend), so a
captured CUDA graph replays for any position. RoPE reads cos/sin tables built on the host exactly as the
reference backend builds them (pyquant.backend.rope_cos_sin: ggml's float32 products), one row per position.
"""

from __future__ import annotations

import math

from numba import cuda, float32

from .jit import block_sum, device, gelu_tanh, kernel, silu

POS0 = 0  # params slot: position of the first token of the batch


@device
def _row_rsqrt(red, x, o, eps, D):
    """1 / sqrt(mean(x[o:o+D]^2) + eps), over the whole block; red: shared float32 (32,) for block_sum."""
    s = float32(0.0)
    for k in range(cuda.threadIdx.x, D, cuda.blockDim.x):
        s += x[o + k] * x[o + k]
    s = block_sum(red, s)
    return 1.0 / math.sqrt(s / D + eps)


@kernel
def rms_norm(y, x, w, eps, D):
    """y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w; one block per row r."""
    o = cuda.blockIdx.x * D
    rs = _row_rsqrt(cuda.shared.array(32, float32), x, o, eps, D)
    for k in range(cuda.threadIdx.x, D, cuda.blockDim.x):
        y[o + k] = x[o + k] * rs * w[k]


@kernel
def rms_add(y, x, w, r, eps, D):
    """y[row, :] = r[row, :] + RMSNorm(x[row, :]) * w (a post-norm and the residual add after it); a block a row."""
    o = cuda.blockIdx.x * D
    rs = _row_rsqrt(cuda.shared.array(32, float32), x, o, eps, D)
    for k in range(cuda.threadIdx.x, D, cuda.blockDim.x):
        y[o + k] = r[o + k] + x[o + k] * rs * w[k]


@kernel
def rope(y, x, cos, sin, params, T, H, D, n_rot, neox):
    """x (T, H, D) -> y: pairs (i, i + n_rot/2) (neox) or (2i, 2i+1) turned by the angle of position
    params[POS0] + t; dims past n_rot copied. A thread per pair slot (T * H * D/2)."""
    idx = cuda.grid(1)
    half = D // 2
    if idx < T * H * half:
        t = idx // (H * half)
        i = idx % half
        o = (idx // half) * D
        hr = n_rot // 2
        if i < hr:
            p = params[POS0] + t
            c, s = cos[p, i], sin[p, i]
            if neox:
                a, b = o + i, o + i + hr
            else:
                a, b = o + 2 * i, o + 2 * i + 1
            xa, xb = x[a], x[b]
            y[a] = xa * c - xb * s
            y[b] = xa * s + xb * c
        else:
            j = o + n_rot + 2 * (i - hr)
            y[j] = x[j]
            y[j + 1] = x[j + 1]


@device
def rope_val(x, cos, sin, p, o, i, n_rot, neox):
    """Value i of the head at offset o of x as `rope` leaves it at position p (the same float32 products)."""
    if i >= n_rot:
        return x[o + i]
    hr = n_rot // 2
    if neox:
        j = i % hr
        xa, xb = x[o + j], x[o + j + hr]
        first = i < hr
    else:
        j = i // 2
        xa, xb = x[o + 2 * j], x[o + 2 * j + 1]
        first = i % 2 == 0
    c, s = cos[p, j], sin[p, j]
    return xa * c - xb * s if first else xa * s + xb * c


@kernel
def swiglu(y, g, u, n):
    i = cuda.grid(1)
    if i < n:
        y[i] = silu(g[i]) * u[i]


@kernel
def geglu(y, g, u, n):
    i = cuda.grid(1)
    if i < n:
        y[i] = gelu_tanh(g[i]) * u[i]


@kernel
def add(y, a, b, n):
    i = cuda.grid(1)
    if i < n:
        y[i] = a[i] + b[i]


@kernel
def scale(y, x, s, n):
    i = cuda.grid(1)
    if i < n:
        y[i] = x[i] * s


def grid1(n: int, block: int = 256):
    return (max(1, -(-n // block)), block)
