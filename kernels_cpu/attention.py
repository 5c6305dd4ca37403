"""Attention over a KV cache kept in block bytes (f32, f16, q8_0 or q4_0 rows), with GQA, causal and
sliding-window masks, in one pass per query (online softmax, FlashAttention's recurrence).

Cache rows are (position, kv head) -> row_bytes: the same GGUF block layout as the weights, so the weight
decoders (`dq16`) read keys and values straight from the cache and nothing is dequantized as a whole.
Scores are made 16 keys at a time: one vector max, one vector exp per tile, and the running output is
rescaled once per tile. A prefill of T tokens never holds more than 16 scores per query at once.

Shapes: q (T, H, Dh) float32, cache (n_ctx, G, row_bytes) uint8, out (T, H, Dv) float32; H = G * group.
"""

from __future__ import annotations

import numpy as np
from numba import literally, prange

from .formats import F16, F32, Q4_0, Q8_0, dq16
from .jit import fast, inline, parallel
from .linear import _row_dot
from .simd import fexp, ffma, fhmax, fload, fmul, fsplat, fstore, fsub, fsum

TILE_S = 16  # keys per score tile


@parallel
def _attend(out, q, kc, vc, pos0, scale, window, fmt):
    literally(fmt)
    t_all, n_head, dk = q.shape
    group = n_head // kc.shape[1]
    dv = out.shape[2]
    for u in prange(t_all * n_head):
        t, h = u // n_head, u % n_head
        g = h // group
        p = pos0 + t
        lo = max(0, p - window + 1) if window > 0 else 0
        hi = p + 1
        qv, o = q[t, h], out[t, h]
        o[:] = 0
        tile = np.empty(TILE_S, np.float32)
        m = -np.inf
        denom = np.float32(0)
        for s0 in range(lo, hi, TILE_S):
            n = min(TILE_S, hi - s0)
            for j in range(TILE_S):
                tile[j] = _row_dot(kc[s0 + j, g], qv, dk // 32, 32, fmt) * scale if j < n else -np.inf
            sv = fload(tile, 0)
            m_new = max(m, fhmax(sv))
            pv = fexp(fsub(sv, fsplat(m_new)))
            corr = np.float32(np.exp(m - m_new))
            denom = denom * corr + fsum(pv)
            m = m_new
            fstore(tile, 0, pv)
            if corr != 1:
                for i in range(0, dv, 16):
                    fstore(o, i, fmul(fload(o, i), fsplat(corr)))
            for j in range(n):
                _add_scaled_row(o, vc[s0 + j, g], tile[j], dv, fmt)
        inv = np.float32(1) / denom
        for i in range(0, dv, 16):
            fstore(o, i, fmul(fload(o, i), fsplat(inv)))


@inline
def _add_scaled_row(o, row, p, dv, fmt):
    """o += p * (decoded cache row of dv values)."""
    ps = fsplat(p)
    for blk in range(dv // 32):
        for g in range(2):
            i = blk * 32 + 16 * g
            fstore(o, i, ffma(dq16(fmt, row, blk, g), ps, fload(o, i)))


@fast
def attend_f32(out, q, kc, vc, pos0, scale, window):
    _attend(out, q, kc, vc, pos0, scale, window, F32)


@fast
def attend_f16(out, q, kc, vc, pos0, scale, window):
    _attend(out, q, kc, vc, pos0, scale, window, F16)


@fast
def attend_q8_0(out, q, kc, vc, pos0, scale, window):
    _attend(out, q, kc, vc, pos0, scale, window, Q8_0)


@fast
def attend_q4_0(out, q, kc, vc, pos0, scale, window):
    _attend(out, q, kc, vc, pos0, scale, window, Q4_0)


ATTEND = {"f32": attend_f32, "f16": attend_f16, "q8_0": attend_q8_0, "q4_0": attend_q4_0}
