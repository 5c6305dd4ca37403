"""Row quantizers for activations and KV-cache writes, bit-exact with pyquant.quants.

`quantize_act` makes the int8 activations of the quantized matvec kernels, as llama.cpp's x86 code makes
its Q8_0 activation blocks (pyquant.quants.q8_0.quantize_blocks_x86): per block of 32, d = f16(max|x| / 127)
and q = rint(x * (127 / max|x|)), halves to even; the codes, d and the values of each 16 (d * sum q) are
kept in separate arrays. `quantize_rows` writes KV-cache rows as GGUF bytes (quantize_row_q8_0_ref,
quantize_row_q4_0_ref and the f16 cast of ggml-quants.c):

    # Q8_0: 32 values in 34 bytes = d:2 qs:32   d = max|x| / 127, q = roundf(x / d)
    # Q4_0: 32 values in 18 bytes = d:2 qs:16   d = max / -8 (max: the value of largest |x|), q = (int)(x/d + 8.5)
    # F16:  1 value in 2 bytes                  round to nearest even

No fastmath here: every product and comparison is the reference's, in float32.
"""

from __future__ import annotations

import numpy as np

from .formats import F16, Q4_0, Q8_0
from .jit import exact
from .simd import fabs, fhmax, fload, fmul, frint, from_half, fsplat, fstore_i8, fsum, to_half

F32 = np.float32


@exact
def quantize_act(xq, xd, xs, x):
    """x (T, K) float32 -> codes xq (T, K) int8, scales xd (T, K/32), d * (sum of each 16 codes) xs (T, K/16)."""
    for t in range(x.shape[0]):
        xt, qt = x[t], xq[t]
        for b in range(x.shape[1] // 32):
            v0 = fload(xt, 32 * b)
            v1 = fload(xt, 32 * b + 16)
            amax = max(fhmax(fabs(v0)), fhmax(fabs(v1)))
            inv = F32(127) / amax if amax != 0 else F32(0)
            d = from_half(to_half(amax / F32(127)))
            xd[t, b] = d
            r0 = frint(fmul(v0, fsplat(inv)))
            r1 = frint(fmul(v1, fsplat(inv)))
            fstore_i8(qt, 32 * b, r0)
            fstore_i8(qt, 32 * b + 16, r1)
            xs[t, 2 * b] = d * fsum(r0)
            xs[t, 2 * b + 1] = d * fsum(r1)


@exact
def _put_half(dst, o, x):
    h = to_half(x)
    dst[o] = h & 0xFF
    dst[o + 1] = h >> 8


@exact
def _roundf(x):
    """C's roundf (halves away from zero), exactly as pyquant.quants.q8_0.roundf."""
    a = abs(x)
    whole = np.floor(a)
    r = whole + np.floor(F32(2) * (a - whole))
    return r if x >= 0 else -r


@exact
def quantize_row_q8_0(dst, x):
    """x (K,) float32 -> dst (K/32*34,) uint8."""
    for b in range(x.shape[0] // 32):
        amax = F32(0)
        for j in range(32):
            amax = max(amax, abs(x[32 * b + j]))
        d = amax / F32(127)
        inv = F32(1) / d if d != 0 else F32(0)
        o = 34 * b
        _put_half(dst, o, d)
        for j in range(32):
            q = np.int64(_roundf(x[32 * b + j] * inv))
            dst[o + 2 + j] = q & 0xFF


@exact
def quantize_row_q4_0(dst, x):
    """x (K,) float32 -> dst (K/32*18,) uint8."""
    for b in range(x.shape[0] // 32):
        amax = F32(0)
        vmax = F32(0)
        for j in range(32):
            v = x[32 * b + j]
            if abs(v) > amax:
                amax = abs(v)
                vmax = v
        d = vmax / F32(-8)
        inv = F32(1) / d if d != 0 else F32(0)
        o = 18 * b
        _put_half(dst, o, d)
        for j in range(16):
            lo = min(np.int64(x[32 * b + j] * inv + F32(8.5)), 15)
            hi = min(np.int64(x[32 * b + 16 + j] * inv + F32(8.5)), 15)
            dst[o + 2 + j] = lo | (hi << 4)


@exact
def quantize_row_f16(dst, x):
    """x (K,) float32 -> dst (2K,) uint8, IEEE halves."""
    for i in range(x.shape[0]):
        _put_half(dst, 2 * i, x[i])


@exact
def quantize_row_f32(dst, x):
    """x (K,) float32 -> dst (4K,) uint8, a plain copy."""
    src = x.view(np.uint8)
    for i in range(src.shape[0]):
        dst[i] = src[i]


@exact
def quantize_rows(dst, x, fmt):
    """x (R, K) float32 -> dst (R, row_bytes) uint8 in format code fmt (F32, F16, Q4_0 or Q8_0 of formats.py)."""
    for r in range(x.shape[0]):
        if fmt == Q8_0:
            quantize_row_q8_0(dst[r], x[r])
        elif fmt == Q4_0:
            quantize_row_q4_0(dst[r], x[r])
        elif fmt == F16:
            quantize_row_f16(dst[r], x[r])
        else:
            quantize_row_f32(dst[r], x[r])


@exact
def store_kv(kc, vc, pos0, k, v, fmt):
    """Write k, v (T, G, Dh) float32 into the cache rows kc, vc (n_ctx, G, row_bytes) at positions pos0..."""
    for t in range(k.shape[0]):
        for g in range(k.shape[1]):
            quantize_rows(kc[pos0 + t, g : g + 1], k[t, g : g + 1], fmt)
            quantize_rows(vc[pos0 + t, g : g + 1], v[t, g : g + 1], fmt)
