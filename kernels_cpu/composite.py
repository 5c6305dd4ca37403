"""Kernels for the composite PTQ linears and the quantized KV cache of pyquant/ptq/runtime.py, whose numpy
classes are the oracle (tests/test_kernels_composite.py).

Shapes: x (T, K) float32 activations, y (T, N) float32, weights as N rows of K values.

Integer linears (w8a8, the int8 part of int8_mixed, both parts of w4a4) are one kernel, `matmul_int`: the K
channels are cut into segments [starts[j], starts[j+1]) (one for w8a8; Atom's int4 groups, then its int8
outlier block), each with a weight scale per row and an activation scale per token. Weight codes are held
as unsigned bytes (code + offsets[j]: 128 for int8, 8 for int4; one byte per code, the files pack int4 in
nibbles), activation codes as int8 with the integer sum of each segment (`quantize_act`), and
simd_i8.idot adds u8 x i8 products in int32 lanes (VPDPBUSD), the offset coming back out as
offset * code sum. The integer dot products are exact and the float64 scaling follows the reference's
order, so the results equal the reference's bit for bit (no fastmath in these kernels).

`matmul_gq` (weight-only "gq", 2/3/4/8-bit codes packed little-endian along the row): each row is decoded
once into float32 (scale * code (+ min)) and dotted with every token (within float32 rounding of the
reference's dense product).

KV cache: K and V as asymmetric codes per (position, head, group) with float16-rounded scale and minimum,
written by `store_kv_quant` exactly as runtime._QuantStore writes them, and decoded by `dequantize_kv` for
attention.py's float32 kernel.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .jit import exact, fast, inline, inline_exact, parallel, parallel_exact
from .simd import from_half, to_half
from .simd_i8 import bload, idot, isum8, izero8

F32 = np.float32
ROWS_PER_ITEM = 16  # gq: rows per work item (one decode buffer each)


# --- activations ---------------------------------------------------------------------------------------------
@parallel_exact
def quantize_act(q, s, qsum, x, perm, starts, bits, clip):
    """Dynamic symmetric codes of xp = x[:, perm] (T, K) per token and segment: for segment j, of bits[j] bits
    with clip ratio clip[j], s[t, j] = clip * max|xp| / hi (float32, hi = 2^(bits-1) - 1) and
    q[t, k] = clip(rint(xp / s), -hi - 1, hi) (0 where s is 0), qsum[t, j] the sum of the segment's codes."""
    for t in prange(x.shape[0]):
        xt = x[t]
        for j in range(starts.shape[0] - 1):
            hi = F32(2 ** (bits[j] - 1) - 1)
            amax = F32(0)
            for k in range(starts[j], starts[j + 1]):
                amax = max(amax, abs(xt[perm[k]]))
            st = F32(clip[j]) * amax / hi
            s[t, j] = st
            total = 0
            for k in range(starts[j], starts[j + 1]):
                v = F32(0)
                if st > 0:
                    v = min(max(np.rint(xt[perm[k]] / st), -hi - F32(1)), hi)
                q[t, k] = np.int8(v)
                total += np.int64(v)
            qsum[t, j] = total


# --- integer linears -----------------------------------------------------------------------------------------
@inline_exact
def _idot2(w0, w1, xq, k0, k1):
    """(w0 . xq, w1 . xq) over [k0, k1): u8 weight bytes times int8 codes, exact (int32 lanes, int64 tail)."""
    a0, a1 = izero8(), izero8()
    k32 = k0 + (k1 - k0) // 32 * 32
    for k in range(k0, k32, 32):
        xb = bload(xq, k)
        a0 = idot(a0, bload(w0, k), xb)
        a1 = idot(a1, bload(w1, k), xb)
    d0, d1 = np.int64(isum8(a0)), np.int64(isum8(a1))
    for k in range(k32, k1):
        d0 += np.int64(w0[k]) * np.int64(xq[k])
        d1 += np.int64(w1[k]) * np.int64(xq[k])
    return d0, d1


@parallel_exact
def matmul_int(y, wu, ws, starts, offsets, xq, xs, xsum):
    """y[t, n] = sum_j (xq[t, S_j] . (wu[n, S_j] - offsets[j])) * xs[t, j] * ws[n, j], S_j = [starts[j],
    starts[j+1]), in float64 then rounded to float32. wu (N, K) uint8, ws (N, J) float32, xq (T, K) int8,
    xs (T, J) float32, xsum (T, J) int64. Rows p and p + ceil(N/2) share each activation load."""
    n = wu.shape[0]
    half = (n + 1) // 2
    for p in prange(half):
        r0, r1 = p, min(p + half, n - 1)
        for t in range(xq.shape[0]):
            acc0, acc1 = 0.0, 0.0
            for j in range(starts.shape[0] - 1):
                d0, d1 = _idot2(wu[r0], wu[r1], xq[t], starts[j], starts[j + 1])
                off = np.int64(offsets[j]) * xsum[t, j]
                sx = np.float64(xs[t, j])
                acc0 += np.float64(d0 - off) * sx * np.float64(ws[r0, j])
                acc1 += np.float64(d1 - off) * sx * np.float64(ws[r1, j])
            y[t, r0] = F32(acc0)
            y[t, r1] = F32(acc1)


@exact
def outlier_columns(out, x, threshold):
    """out[k] = any |x[:, k]| > threshold (LLM.int8()'s outlier columns); returns their count."""
    out[:] = False
    for t in range(x.shape[0]):
        for k in range(x.shape[1]):
            if abs(x[t, k]) > threshold:
                out[k] = True
    return out.sum()


# --- weight-only groups (gq) ---------------------------------------------------------------------------------
@inline
def _decode_row(wf, row, scale, mins, bits, lo):
    """A packed row -> wf (K,) float32 = scale * code (+ min) per group; code = unsigned field + lo (bits < 8),
    the byte as int8 (bits 8). Eight codes of `bits` bits fill `bits` whole bytes."""
    group = wf.shape[0] // scale.shape[0]
    if bits == 8:
        for k in range(wf.shape[0]):
            wf[k] = F32(np.int8(row[k])) * scale[k // group]
    else:
        mask = (1 << bits) - 1
        for c in range(wf.shape[0] // 8):
            word = 0
            for b in range(bits):
                word |= np.int64(row[c * bits + b]) << (8 * b)
            for i in range(8):
                k = 8 * c + i
                wf[k] = F32(((word >> (bits * i)) & mask) + lo) * scale[k // group]
    if mins.shape[0]:
        for k in range(wf.shape[0]):
            wf[k] += mins[k // group]


@parallel
def matmul_gq(y, w, scale, mins, x, bits, lo):
    """y = x @ W.T with W decoded row by row from w (N, K * bits / 8) uint8, scale (N, G) and mins (N, G) float32
    (mins (N, 0): symmetric). Work items of ROWS_PER_ITEM rows, each with one float32 row buffer."""
    n, k_in = w.shape[0], x.shape[1]
    for item in prange((n + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM):
        wf = np.empty(k_in, F32)
        for r in range(item * ROWS_PER_ITEM, min(n, (item + 1) * ROWS_PER_ITEM)):
            _decode_row(wf, w[r], scale[r], mins[r], bits, lo)
            for t in range(x.shape[0]):
                acc = F32(0)
                for k in range(k_in):
                    acc += wf[k] * x[t, k]
                y[t, r] = acc


@fast
def dequantize_gq(out, w, scale, mins, bits, lo):
    """All rows of a gq weight as float32 (tests)."""
    for r in range(w.shape[0]):
        _decode_row(out[r], w[r], scale[r], mins[r], bits, lo)


# --- quantized KV cache --------------------------------------------------------------------------------------
@exact
def store_kv_quant(codes, scale, mins, pos0, x, bits):
    """x (T, H, D) float32 into codes (n_ctx, H, D) uint8, scale/mins (n_ctx, H, D / group) float32 at
    positions pos0..: per group lo = min, s = f16((max - lo) / (2^bits - 1)), m = f16(lo),
    code = clip(rint((x - m) / s), 0, 2^bits - 1) (0 where s is 0)."""
    top = F32(2**bits - 1)
    n_groups = scale.shape[2]
    group = x.shape[2] // n_groups
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            xs = x[t, h]
            for j in range(n_groups):
                lo, hi = xs[j * group], xs[j * group]
                for k in range(j * group, (j + 1) * group):
                    lo, hi = min(lo, xs[k]), max(hi, xs[k])
                s = from_half(to_half((hi - lo) / top))
                m = from_half(to_half(lo))
                scale[pos0 + t, h, j], mins[pos0 + t, h, j] = s, m
                for k in range(j * group, (j + 1) * group):
                    v = F32(0)
                    if s > 0:
                        v = min(max(np.rint((xs[k] - m) / s), F32(0)), top)
                    codes[pos0 + t, h, k] = np.uint8(v)


@exact
def dequantize_kv(out, codes, scale, mins):
    """codes (S, H, D) -> out (S, H, D) float32 = code * scale + min per group."""
    group = codes.shape[2] // scale.shape[2]
    for s in range(codes.shape[0]):
        for h in range(codes.shape[1]):
            for k in range(codes.shape[2]):
                out[s, h, k] = F32(codes[s, h, k]) * scale[s, h, k // group] + mins[s, h, k // group]
