"""y = x @ W.T computed on packed weight rows: matrix-vector for decode, blocked matrix-matrix for prefill.

Shapes: x (T, K) float32 activations, W (N, row_bytes) uint8 (GGUF bytes of N rows of K values), y (T, N).

- `matvec_<type>` (decode, small T): one pass over the weights, rows split across threads; each row is dotted
  with every token while its bytes sit in L1. Quantized types take int8 activations (act_quant.quantize_act)
  and integer dot products (formats.vdot, llama.cpp's vec_dot); float types decode into float registers.
- `matmul_<type>` (prefill): 32 rows at a time are decoded into a transposed float32 panel (K, 32) that
  stays in L2 (16 x 16 blocks transposed in registers), then a register-tiled kernel (12 tokens x 32 rows, 24 accumulators) multiplies every
  token with it; the weight bytes are read once per call and decoded once per 32 rows.
- `dequantize_<type>`: rows `ids` of W as float32 (embedding lookups, tests).
Each public kernel is a two-line specialization of the generic bodies to one format code.
"""

from __future__ import annotations

import numpy as np
from numba import literally, prange

from .formats import (
    BF16,
    F16,
    F32,
    FORMATS,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    block_values,
    dq16,
    vdot,
)
from .jit import fast, inline, parallel
from .simd import fadd, ffma, fget, fload, fput, fregs, fsplat, fstore, fsum, ftranspose16, fzero

PANEL = 32  # rows per decoded panel (two vectors)
TILE_T = 12  # tokens per register tile


# --- generic bodies -----------------------------------------------------------------------------------------
@inline
def _row_dot(row, xt, nb, bv, fmt):
    """Packed row . xt (K float32), two accumulators."""
    a0 = fzero()
    a1 = fzero()
    for blk in range(nb):
        base = blk * bv
        for g in range(0, bv // 16, 2):
            a0 = ffma(dq16(fmt, row, blk, g), fload(xt, base + 16 * g), a0)
            a1 = ffma(dq16(fmt, row, blk, g + 1), fload(xt, base + 16 * g + 16), a1)
    return fsum(fadd(a0, a1))


@parallel
def _matvec(y, w, x, fmt):
    literally(fmt)
    bv = block_values(fmt)
    nb = x.shape[1] // bv
    for r in prange(w.shape[0]):
        row = w[r]
        for t in range(x.shape[0]):
            y[t, r] = _row_dot(row, x[t], nb, bv, fmt)


@inline
def _row_pair(y, w, p, xq, xd, xs, fmt):
    """Rows p and p + ceil(N/2): a pair shares each activation block load. The two rows are far apart on
    purpose: adjacent rows read block by block interleave two streams 1 row apart, which the hardware
    prefetcher follows badly (qwen's output matrix, 138 MB: 20 ms adjacent, 5.5 ms far apart, 6.6 ms one
    row at a time). With N odd the last row is done twice."""
    half = (w.shape[0] + 1) // 2
    r0 = p
    r1 = min(p + half, w.shape[0] - 1)
    for t in range(xq.shape[0]):
        y[t, r0], y[t, r1] = vdot(fmt, w[r0], w[r1], xq[t], xd[t], xs[t])


@parallel
def _matvec_q(y, w, xq, xd, xs, fmt):
    literally(fmt)
    for p in prange((w.shape[0] + 1) // 2):
        _row_pair(y, w, p, xq, xd, xs, fmt)


@parallel
def _matvec_group(y0, w0, y1, w1, y2, w2, xq, xd, xs, f0, f1, f2):
    """Three weights that read the same activations (q/k/v, gate/up + an empty one) in one parallel region."""
    literally(f0)
    literally(f1)
    literally(f2)
    p0, p1, p2 = (w0.shape[0] + 1) // 2, (w1.shape[0] + 1) // 2, (w2.shape[0] + 1) // 2
    for p in prange(p0 + p1 + p2):
        if p < p0:
            _row_pair(y0, w0, p, xq, xd, xs, f0)
        elif p < p0 + p1:
            _row_pair(y1, w1, p - p0, xq, xd, xs, f1)
        else:
            _row_pair(y2, w2, p - p0 - p1, xq, xd, xs, f2)


_GROUP_ENTRIES: dict[tuple[int, int, int], object] = {}


def matvec_group(ys, ws, types_, xq, xd, xs):
    """ys[i] = int8 activations @ ws[i].T for 2 or 3 quantized weights of one input, in one parallel region.

    The kernel is specialized to its three format codes; after the first call the compiled entry point is
    called directly (through the dispatcher a `literally` kernel is re-typed on every call, ~40 ms). The
    activations come from act_quant.quantize_act (C-contiguous int8/float32 arrays)."""
    if len(ws) == 2:  # a third weight of no rows
        empty = np.empty((0, ws[1].shape[1]), np.uint8)
        empty.flags.writeable = False
        ys, ws, types_ = (*ys, np.empty((ys[1].shape[0], 0), np.float32)), (*ws, empty), (*types_, types_[1])
    # the entry point takes no type checks: every array must be what the one compiled signature expects
    assert all(y.flags.c_contiguous and y.dtype == np.float32 and y.ndim == 2 for y in ys)
    assert all(w.flags.c_contiguous and not w.flags.writeable and w.ndim == 2 for w in ws)
    codes = tuple(FORMATS[t].code for t in types_)
    args = (ys[0], ws[0], ys[1], ws[1], ys[2], ws[2], xq, xd, xs, *codes)
    entry = _GROUP_ENTRIES.get(codes)
    if entry is None:
        _matvec_group(*args)
        for sig, cres in _matvec_group.overloads.items():
            if tuple(getattr(a, "literal_value", None) for a in sig[-3:]) == codes:
                _GROUP_ENTRIES[codes] = cres.entry_point
        return
    entry(*args)


@fast
def _dequantize(out, w, ids, fmt):
    literally(fmt)
    bv = block_values(fmt)
    nb = out.shape[1] // bv
    for i in range(ids.shape[0]):  # embedding rows: a few, on the calling thread
        row = w[ids[i]]
        dst = out[i]
        for blk in range(nb):
            for g in range(bv // 16):
                fstore(dst, blk * bv + 16 * g, dq16(fmt, row, blk, g))


@parallel
def _matmul(y, w, x, fmt):
    literally(fmt)
    bv = block_values(fmt)
    n, k = w.shape[0], x.shape[1]
    nb = k // bv
    for c in prange((n + PANEL - 1) // PANEL):
        r0 = c * PANEL
        nr = min(PANEL, n - r0)
        panel = np.empty(k * PANEL, np.float32)  # (K, 32): row r0 + i of W in column i
        regs = fregs(16)
        for blk in range(nb):
            for g in range(bv // 16):
                for half in range(2):  # rows r0 + 16 half .. + 16, 16 values each, turned into 16 columns
                    for i in range(16):
                        r = 16 * half + i
                        fput(regs, i, dq16(fmt, w[r0 + r], blk, g) if r < nr else fzero())
                    ftranspose16(regs)
                    k0 = blk * bv + 16 * g
                    for i in range(16):
                        fstore(panel, (k0 + i) * PANEL + 16 * half, fget(regs, i))
        _panel_tokens(y, x, panel, r0, nr)


@inline
def _store_rows(yt, r0, nr, v0, v1):
    """yt[r0:r0+nr] = the first nr lanes of (v0, v1)."""
    if nr == PANEL:
        fstore(yt, r0, v0)
        fstore(yt, r0 + 16, v1)
    else:
        tmp = np.empty(PANEL, np.float32)
        fstore(tmp, 0, v0)
        fstore(tmp, 16, v1)
        for i in range(nr):
            yt[r0 + i] = tmp[i]


@inline
def _tile(y, x, panel, r0, nr, t0, acc, tt):
    """y[t0:t0+tt, r0:r0+nr] = x[t0:t0+tt] @ panel, tt (a constant) tokens x 32 rows in 2*tt registers."""
    for i in range(2 * tt):
        fput(acc, i, fzero())
    for kk in range(x.shape[1]):
        w0 = fload(panel, kk * PANEL)
        w1 = fload(panel, kk * PANEL + 16)
        for t in range(tt):
            xs = fsplat(x[t0 + t, kk])
            fput(acc, 2 * t, ffma(w0, xs, fget(acc, 2 * t)))
            fput(acc, 2 * t + 1, ffma(w1, xs, fget(acc, 2 * t + 1)))
    for t in range(tt):
        _store_rows(y[t0 + t], r0, nr, fget(acc, 2 * t), fget(acc, 2 * t + 1))


@fast
def _panel_tokens(y, x, panel, r0, nr):
    """y[:, r0:r0+nr] = x @ panel: tiles of TILE_T tokens, then of 4, then single tokens."""
    t_all = x.shape[0]
    acc = fregs(24)  # 2 * TILE_T
    t0 = 0
    while t0 + TILE_T <= t_all:
        _tile(y, x, panel, r0, nr, t0, acc, TILE_T)
        t0 += TILE_T
    while t0 + 4 <= t_all:
        _tile(y, x, panel, r0, nr, t0, acc, 4)
        t0 += 4
    while t0 < t_all:
        _tile(y, x, panel, r0, nr, t0, acc, 1)
        t0 += 1


# --- public kernels, one per format -------------------------------------------------------------------------
@fast
def matvec_f32(y, w, x):
    _matvec(y, w, x, F32)


@fast
def matvec_f16(y, w, x):
    _matvec(y, w, x, F16)


@fast
def matvec_bf16(y, w, x):
    _matvec(y, w, x, BF16)


@fast
def matvec_q4_0(y, w, xq, xd, xs):
    _matvec_q(y, w, xq, xd, xs, Q4_0)


@fast
def matvec_q4_1(y, w, xq, xd, xs):
    _matvec_q(y, w, xq, xd, xs, Q4_1)


@fast
def matvec_q5_0(y, w, xq, xd, xs):
    _matvec_q(y, w, xq, xd, xs, Q5_0)


@fast
def matvec_q5_1(y, w, xq, xd, xs):
    _matvec_q(y, w, xq, xd, xs, Q5_1)


@fast
def matvec_q8_0(y, w, xq, xd, xs):
    _matvec_q(y, w, xq, xd, xs, Q8_0)


@fast
def matvec_q2_k(y, w, xq, xd, xs):
    _matvec_q(y, w, xq, xd, xs, Q2_K)


@fast
def matvec_q3_k(y, w, xq, xd, xs):
    _matvec_q(y, w, xq, xd, xs, Q3_K)


@fast
def matvec_q4_k(y, w, xq, xd, xs):
    _matvec_q(y, w, xq, xd, xs, Q4_K)


@fast
def matvec_q5_k(y, w, xq, xd, xs):
    _matvec_q(y, w, xq, xd, xs, Q5_K)


@fast
def matvec_q6_k(y, w, xq, xd, xs):
    _matvec_q(y, w, xq, xd, xs, Q6_K)


@fast
def dequantize_f32(out, w, ids):
    _dequantize(out, w, ids, F32)


@fast
def dequantize_f16(out, w, ids):
    _dequantize(out, w, ids, F16)


@fast
def dequantize_bf16(out, w, ids):
    _dequantize(out, w, ids, BF16)


@fast
def dequantize_q4_0(out, w, ids):
    _dequantize(out, w, ids, Q4_0)


@fast
def dequantize_q4_1(out, w, ids):
    _dequantize(out, w, ids, Q4_1)


@fast
def dequantize_q5_0(out, w, ids):
    _dequantize(out, w, ids, Q5_0)


@fast
def dequantize_q5_1(out, w, ids):
    _dequantize(out, w, ids, Q5_1)


@fast
def dequantize_q8_0(out, w, ids):
    _dequantize(out, w, ids, Q8_0)


@fast
def dequantize_q2_k(out, w, ids):
    _dequantize(out, w, ids, Q2_K)


@fast
def dequantize_q3_k(out, w, ids):
    _dequantize(out, w, ids, Q3_K)


@fast
def dequantize_q4_k(out, w, ids):
    _dequantize(out, w, ids, Q4_K)


@fast
def dequantize_q5_k(out, w, ids):
    _dequantize(out, w, ids, Q5_K)


@fast
def dequantize_q6_k(out, w, ids):
    _dequantize(out, w, ids, Q6_K)


@fast
def matmul_f32(y, w, x):
    _matmul(y, w, x, F32)


@fast
def matmul_f16(y, w, x):
    _matmul(y, w, x, F16)


@fast
def matmul_bf16(y, w, x):
    _matmul(y, w, x, BF16)


@fast
def matmul_q4_0(y, w, x):
    _matmul(y, w, x, Q4_0)


@fast
def matmul_q4_1(y, w, x):
    _matmul(y, w, x, Q4_1)


@fast
def matmul_q5_0(y, w, x):
    _matmul(y, w, x, Q5_0)


@fast
def matmul_q5_1(y, w, x):
    _matmul(y, w, x, Q5_1)


@fast
def matmul_q8_0(y, w, x):
    _matmul(y, w, x, Q8_0)


@fast
def matmul_q2_k(y, w, x):
    _matmul(y, w, x, Q2_K)


@fast
def matmul_q3_k(y, w, x):
    _matmul(y, w, x, Q3_K)


@fast
def matmul_q4_k(y, w, x):
    _matmul(y, w, x, Q4_K)


@fast
def matmul_q5_k(y, w, x):
    _matmul(y, w, x, Q5_K)


@fast
def matmul_q6_k(y, w, x):
    _matmul(y, w, x, Q6_K)


MATVEC = {name: globals()[f"matvec_{name}"] for name in FORMATS}
MATMUL = {name: globals()[f"matmul_{name}"] for name in FORMATS}
DEQUANTIZE = {name: globals()[f"dequantize_{name}"] for name in FORMATS}
