"""Attention over a KV cache kept in block bytes (f32, f16, q8_0 or q4_0 rows), with GQA, causal and
sliding-window masks, in one pass over the keys (online softmax, FlashAttention's recurrence).

Cache rows are (position, kv head) -> row_bytes: the same GGUF block layout as the weights, so the weight
decoders (`dq16`) read keys and values straight from the cache and nothing is dequantized as a whole.

Work is split by kv head and by tiles of 16 queries. For each tile of 16 keys, the keys are decoded once
into a transposed float32 tile (Dk, 16) and the values into (16, Dv); then every query of the tile times
every query head of the GQA group (up to 16 x group rows) makes its 16 scores as one vector (Dk broadcast
FMAs, no horizontal sums), masks them, and updates its running max, sum and output (rescaled once per key
tile). A prefill of T tokens never holds more than 16 scores per query at once.

Shapes: q (T, H, Dh) float32, cache (n_ctx, G, row_bytes) uint8, out (T, H, Dv) float32; H = G * group.
"""

from __future__ import annotations

import numpy as np
from numba import literally, prange

from .formats import F16, F32, Q4_0, Q8_0, dq16
from .jit import fast, inline, parallel
from .simd import (
    fadd,
    fexp,
    ffma,
    fget,
    fhmax,
    fload,
    fmul,
    fput,
    fregs,
    from_half,
    fsplat,
    fstore,
    fsub,
    fsum,
    ftranspose16,
    fzero,
    to_half,
)

TILE_S = 16  # keys per tile
TILE_Q = 16  # query positions per work item

F32_ = np.float32


@inline
def _decode_tiles(kt, vt, kc, vc, g, s0, ns, dk, dv, regs, fmt):
    """Keys s0..s0+ns of kv head g into kt (Dk, 16) transposed (16 x 16 blocks turned in registers), values
    into vt (16, Dv); zeros past ns."""
    for blk in range(dk // 32):
        for gg in range(2):
            for j in range(TILE_S):
                fput(regs, j, dq16(fmt, kc[s0 + j, g], blk, gg) if j < ns else fzero())
            ftranspose16(regs)
            d0 = blk * 32 + 16 * gg
            for i in range(16):
                fstore(kt[d0 + i], 0, fget(regs, i))
    for j in range(TILE_S):
        for blk in range(dv // 32):
            for gg in range(2):
                v = dq16(fmt, vc[s0 + j, g], blk, gg) if j < ns else fzero()
                fstore(vt[j], blk * 32 + 16 * gg, v)


@inline
def _scores(qi, kt, dk):
    """16 scores of one (pre-scaled) query row against the transposed key tile (4 independent sums)."""
    a0, a1, a2, a3 = fzero(), fzero(), fzero(), fzero()
    for d in range(0, dk, 4):
        a0 = ffma(fsplat(qi[d]), fload(kt[d], 0), a0)
        a1 = ffma(fsplat(qi[d + 1]), fload(kt[d + 1], 0), a1)
        a2 = ffma(fsplat(qi[d + 2]), fload(kt[d + 2], 0), a2)
        a3 = ffma(fsplat(qi[d + 3]), fload(kt[d + 3], 0), a3)
    return fadd(fadd(a0, a1), fadd(a2, a3))


@parallel
def _attend(out, q, kc, vc, pos0, scale, window, fmt):
    literally(fmt)
    t_all, n_head, dk = q.shape
    n_kv = kc.shape[1]
    group = n_head // n_kv
    dv = out.shape[2]
    n_qt = (t_all + TILE_Q - 1) // TILE_Q
    for u in prange(n_kv * n_qt):
        g, t0 = u // n_qt, (u % n_qt) * TILE_Q
        nt = min(TILE_Q, t_all - t0)
        nq = nt * group  # rows: (query position, head of the group)
        qs = np.empty((nq, dk), F32_)
        for i in range(nq):
            qi = q[t0 + i // group, g * group + i % group]
            for d in range(dk):  # an f16 cache: ggml's f16 dot products take Q rounded to f16 too
                qs[i, d] = (from_half(to_half(qi[d])) if fmt == F16 else qi[d]) * scale
        acc = np.zeros((nq, dv), F32_)
        run_max = np.full(nq, -np.inf, F32_)
        run_sum = np.zeros(nq, F32_)
        kt = np.empty((dk, TILE_S), F32_)
        vt = np.empty((TILE_S, dv), F32_)
        tmp = np.empty(TILE_S, F32_)
        regs = fregs(16)
        first, last = pos0 + t0, pos0 + t0 + nt - 1
        s_begin = max(0, first - window + 1) if window > 0 else 0
        for s0 in range(s_begin, last + 1, TILE_S):
            _decode_tiles(kt, vt, kc, vc, g, s0, min(TILE_S, last + 1 - s0), dk, dv, regs, fmt)
            for i in range(nq):
                p = first + i // group
                lo = max(0, p - window + 1) if window > 0 else 0
                if s0 > p or s0 + TILE_S <= lo:
                    continue
                sv = _scores(qs[i], kt, dk)
                if s0 < lo or s0 + TILE_S > p + 1:  # mask keys outside [lo, p]
                    fstore(tmp, 0, sv)
                    for j in range(TILE_S):
                        if s0 + j < lo or s0 + j > p:
                            tmp[j] = -np.inf
                    sv = fload(tmp, 0)
                m_new = max(run_max[i], fhmax(sv))
                pv = fexp(fsub(sv, fsplat(m_new)))
                corr = F32_(np.exp(run_max[i] - m_new))
                run_max[i] = m_new
                run_sum[i] = run_sum[i] * corr + fsum(pv)
                fstore(tmp, 0, pv)
                ai = acc[i]
                for c in range(0, dv, 16):
                    o = fmul(fload(ai, c), fsplat(corr))
                    for j in range(TILE_S):
                        o = ffma(fload(vt[j], c), fsplat(tmp[j]), o)
                    fstore(ai, c, o)
        for i in range(nq):
            o = out[t0 + i // group, g * group + i % group]
            inv = F32_(1) / run_sum[i]
            for c in range(0, dv, 16):
                fstore(o, c, fmul(fload(acc[i], c), fsplat(inv)))


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
