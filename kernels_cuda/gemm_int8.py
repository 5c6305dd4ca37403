"""int8 matrix products: exact int32 GEMMs (dp4a on CUDA cores, mma.sync on the tensor cores) and the
block-scaled product that prefill and W8A8 use.

    gemm_s8_dp4a / gemm_s8_mma   C (M, N) int32 = A (M, K) int8 @ B (N, K) int8 ^T, exact
    gemm_q8                      y (T, N) f32 = sum over 32-blocks b of
                                 sa[t, b] * (sw[n, 2b] * dot_lo + sw[n, 2b+1] * dot_hi) - asum[t, b] * mw[n, b]
                                 with dot_lo/hi the int8 dot products of the block's two halves (PER16 formats:
                                 q6_k), or sa * sw * dot over the whole block (the others); asum = sa * sum(qa)
                                 serves the formats with a min (q4_1, q5_1, q4_k, q5_k).
    quantize_q8                  activations (T, K) f32 -> int8 codes, scales, scaled sums per 32-block
                                 (q8_0's rounding: q = roundf(x / d), d = max|x| / 127)

Operands are passed as int32 words of 4 int8 (little-endian), rows of K/4 words. The instructions are
inline PTX (isa.py).
"""

from __future__ import annotations

import math
from numba import cuda, float32, int32

from .isa import dp4a, mma_s8
from .jit import device, kernel

# ---- exact int32 GEMMs ----------------------------------------------------------------------------------

BM, BN, BKW = 128, 128, 16  # block tile: rows, cols, K in words (64 int8)
PAD = BKW + 4  # smem row stride in words: conflict-free fragment reads


@device
def _fetch(a, r0, rows, kw0, kwords, rs):
    """This thread's 8 words of a's (8 rs) x 16-word tile at (r0, kw0) (rows tid/16 + rs i, word tid % 16; rs =
    threads / 16), as registers: the loads carry no branch, so all 8 are in flight at once and the caller
    issues them before the previous tile's mma loop (a register-staged double buffer). Rows past the end read
    the last row (their outputs are dropped); words past the end read as 0."""
    tid = cuda.threadIdx.x
    r = r0 + tid // BKW
    w = kw0 + tid % BKW
    wc = min(w, kwords - 1)
    last = rows - 1
    keep = int32(-1) if w < kwords else int32(0)
    return (a[min(r, last), wc] & keep, a[min(r + rs, last), wc] & keep, a[min(r + 2 * rs, last), wc] & keep,
            a[min(r + 3 * rs, last), wc] & keep, a[min(r + 4 * rs, last), wc] & keep,
            a[min(r + 5 * rs, last), wc] & keep, a[min(r + 6 * rs, last), wc] & keep,
            a[min(r + 7 * rs, last), wc] & keep)


@device
def _put(s, v, rs):
    """The words _fetch returned into the shared tile s."""
    tid = cuda.threadIdx.x
    r, w = tid // BKW, tid % BKW
    s[r, w], s[r + rs, w], s[r + 2 * rs, w], s[r + 3 * rs, w] = v[0], v[1], v[2], v[3]
    s[r + 4 * rs, w], s[r + 5 * rs, w], s[r + 6 * rs, w], s[r + 7 * rs, w] = v[4], v[5], v[6], v[7]


@kernel
def gemm_s8_mma(c, a, b, M, N, KW):
    """c (M, N) int32 = a (M, KW) @ b (N, KW)^T over int8 lanes; grid (N/128, M/128), 256 threads."""
    sa = cuda.shared.array((BM, PAD), int32)
    sb = cuda.shared.array((BN, PAD), int32)
    tid = cuda.threadIdx.x
    warp, lane = tid // 32, tid % 32
    g, tig = lane // 4, lane % 4
    wm = (warp // 4) * 64  # 2 x 4 warps, 64 x 32 each
    wn = (warp % 4) * 32
    m0 = cuda.blockIdx.y * BM
    n0 = cuda.blockIdx.x * BN
    acc = cuda.local.array(64, int32)
    for i in range(64):
        acc[i] = 0
    va = _fetch(a, m0, M, 0, KW, BM // 8)
    vb = _fetch(b, n0, N, 0, KW, BM // 8)
    for kw0 in range(0, KW, BKW):
        _put(sa, va, BM // 8)
        _put(sb, vb, BM // 8)
        cuda.syncthreads()
        va = _fetch(a, m0, M, kw0 + BKW, KW, BM // 8)  # the next tile's loads fly during this tile's mma
        vb = _fetch(b, n0, N, kw0 + BKW, KW, BM // 8)
        for kk in range(0, BKW, 8):
            for mi in range(4):
                r = wm + 16 * mi + g
                a0, a1 = sa[r, kk + tig], sa[r + 8, kk + tig]
                a2, a3 = sa[r, kk + tig + 4], sa[r + 8, kk + tig + 4]
                for ni in range(4):
                    cn = wn + 8 * ni + g
                    o = 16 * mi + 4 * ni
                    d = mma_s8(a0, a1, a2, a3, sb[cn, kk + tig], sb[cn, kk + tig + 4],
                               acc[o], acc[o + 1], acc[o + 2], acc[o + 3])
                    acc[o], acc[o + 1], acc[o + 2], acc[o + 3] = d[0], d[1], d[2], d[3]
        cuda.syncthreads()
    for mi in range(4):
        for ni in range(4):
            for i in range(4):
                row = m0 + wm + 16 * mi + g + 8 * (i // 2)
                col = n0 + wn + 8 * ni + 2 * tig + i % 2
                if row < M and col < N:
                    c[row, col] = acc[16 * mi + 4 * ni + i]


@kernel
def gemm_s8_dp4a(c, a, b, M, N, KW):
    """As gemm_s8_mma with dp4a on the CUDA cores: 64 x 64 tiles, 256 threads of 4 x 4 outputs."""
    sa = cuda.shared.array((64, 9), int32)
    sb = cuda.shared.array((64, 9), int32)
    tid = cuda.threadIdx.x
    tx, ty = tid % 16, tid // 16
    m0 = cuda.blockIdx.y * 64
    n0 = cuda.blockIdx.x * 64
    acc = cuda.local.array(16, int32)
    for i in range(16):
        acc[i] = 0
    for kw0 in range(0, KW, 8):
        for i in range(2):
            idx = tid + 256 * i
            r, w = idx // 8, idx % 8
            ok = kw0 + w < KW
            sa[r, w] = a[m0 + r, kw0 + w] if ok and m0 + r < M else 0
            sb[r, w] = b[n0 + r, kw0 + w] if ok and n0 + r < N else 0
        cuda.syncthreads()
        for w in range(8):
            for i in range(4):
                av = sa[ty * 4 + i, w]
                for j in range(4):
                    acc[4 * i + j] = dp4a(av, sb[tx * 4 + j, w], acc[4 * i + j])
        cuda.syncthreads()
    for i in range(4):
        for j in range(4):
            row, col = m0 + ty * 4 + i, n0 + tx * 4 + j
            if row < M and col < N:
                c[row, col] = acc[4 * i + j]


# ---- block-scaled GEMM (prefill, W8A8) -------------------------------------------------------------------

HAS_BIAS, HAS_RES = 1, 2
_Q8: dict = {}
TILES = (128, 64)  # square block tiles of gemm_q8: 8 warps of 64 x 32 outputs, or 4 warps of 32 x 32


def gemm_q8_kernel(per16: bool, mins: bool, tile: int = 128):
    key = (per16, mins, tile)
    if key not in _Q8:
        _Q8[key] = _make_gemm_q8(per16, mins, tile)
    return _Q8[key]


def gemm_q8_tile(M: int, N: int, n_sm: int) -> int:
    """The larger tile while it still gives every multiprocessor two blocks; prefill's shapes (512 tokens by
    896 or 128 outputs: 28 or 4 blocks of 128 x 128 on 132 SMs) take the smaller."""
    for tile in TILES:
        if -(-M // tile) * -(-N // tile) >= 2 * n_sm:
            return tile
    return TILES[-1]


@device
def _fetch_scales(sa, asum, sw, mw, ra, cb, kb, mins):
    return (sa[ra, kb], asum[ra, kb] if mins else float32(0.0), sw[cb, 2 * kb], sw[cb, 2 * kb + 1],
            mw[cb, kb] if mins else float32(0.0))


def _make_gemm_q8(per16, mins, tile):
    rs = tile // 8  # rows a load step covers: 2 x tile threads / 16 words a row
    wrows = tile // 2  # 2 warps down a tile, tile / 32 across, each wrows x 32 outputs
    wcols = tile // 32
    mi_n = wrows // 16  # 16-row mma fragments a warp stacks
    n_acc = 16 * mi_n

    @kernel
    def gemm_q8(y, aq, sa, asum, bq, sw, mw, bias, res, flags, T, N, KW):
        """y (T, N) f32; aq (T, KW) int32 words, sa/asum (T, K/32); bq (N, KW), sw (N, K/16), mw (N, K/32)."""
        s_a = cuda.shared.array((tile, PAD), int32)
        s_b = cuda.shared.array((tile, PAD), int32)
        # the tile's scales, staged with its codes: the epilogue of every mma reads them
        s_sa = cuda.shared.array((tile, 2), float32)
        s_as = cuda.shared.array((tile, 2), float32)
        s_sw = cuda.shared.array((tile, 4), float32)
        s_mw = cuda.shared.array((tile, 2), float32)
        tid = cuda.threadIdx.x
        warp, lane = tid // 32, tid % 32
        g, tig = lane // 4, lane % 4
        wm = (warp // wcols) * wrows
        wn = (warp % wcols) * 32
        m0 = cuda.blockIdx.y * tile
        n0 = cuda.blockIdx.x * tile
        nkb = KW // 8  # 32-blocks along K
        acc = cuda.local.array(n_acc, float32)
        for i in range(n_acc):
            acc[i] = 0.0
        sr, sj = tid // 2, tid % 2  # 2 x tile threads: the scales of a (row, block) each
        ra, cb = min(m0 + sr, T - 1), min(n0 + sr, N - 1)
        va = _fetch(aq, m0, T, 0, KW, rs)
        vb = _fetch(bq, n0, N, 0, KW, rs)
        vs = _fetch_scales(sa, asum, sw, mw, ra, cb, min(sj, nkb - 1), mins)
        for kw0 in range(0, KW, BKW):
            _put(s_a, va, rs)
            _put(s_b, vb, rs)
            s_sa[sr, sj], s_as[sr, sj], s_sw[sr, 2 * sj], s_sw[sr, 2 * sj + 1], s_mw[sr, sj] = vs
            cuda.syncthreads()
            va = _fetch(aq, m0, T, kw0 + BKW, KW, rs)  # the next tile's loads fly during this tile's mma
            vb = _fetch(bq, n0, N, kw0 + BKW, KW, rs)
            vs = _fetch_scales(sa, asum, sw, mw, ra, cb, min(kw0 // 8 + 2 + sj, nkb - 1), mins)
            for j in range(2):
                kk = 8 * j
                if kw0 + kk < KW:
                    for mi in range(mi_n):
                        r = wm + 16 * mi + g
                        a0, a1 = s_a[r, kk + tig], s_a[r + 8, kk + tig]
                        a2, a3 = s_a[r, kk + tig + 4], s_a[r + 8, kk + tig + 4]
                        sa0, sa1 = s_sa[r, j], s_sa[r + 8, j]
                        for ni in range(4):
                            cn = wn + 8 * ni + g
                            b0, b1 = s_b[cn, kk + tig], s_b[cn, kk + tig + 4]
                            o = 16 * mi + 4 * ni
                            c = wn + 8 * ni + 2 * tig
                            if per16:
                                lo = mma_s8(a0, a1, 0, 0, b0, 0, 0, 0, 0, 0)
                                hi = mma_s8(0, 0, a2, a3, 0, b1, 0, 0, 0, 0)
                                for i in range(4):
                                    cc = c + i % 2
                                    v = (sa0 if i < 2 else sa1) * (s_sw[cc, 2 * j] * float32(lo[i])
                                                                    + s_sw[cc, 2 * j + 1] * float32(hi[i]))
                                    if mins:
                                        v -= (s_as[r, j] if i < 2 else s_as[r + 8, j]) * s_mw[cc, j]
                                    acc[o + i] += v
                            else:
                                d = mma_s8(a0, a1, a2, a3, b0, b1, 0, 0, 0, 0)
                                for i in range(4):
                                    cc = c + i % 2
                                    v = (sa0 if i < 2 else sa1) * s_sw[cc, 2 * j] * float32(d[i])
                                    if mins:
                                        v -= (s_as[r, j] if i < 2 else s_as[r + 8, j]) * s_mw[cc, j]
                                    acc[o + i] += v
            cuda.syncthreads()
        for mi in range(mi_n):
            for ni in range(4):
                for i in range(4):
                    row = m0 + wm + 16 * mi + g + 8 * (i // 2)
                    col = n0 + wn + 8 * ni + 2 * tig + i % 2
                    if row < T and col < N:
                        v = acc[16 * mi + 4 * ni + i]
                        if flags & HAS_BIAS:
                            v += bias[col]
                        if flags & HAS_RES:
                            v += res[row * N + col]
                        y[row * N + col] = v

    return gemm_q8


def gemm_grid(M: int, N: int, tile: int = 128):
    return (-(-N // tile), -(-M // tile)), 2 * tile


@kernel
def quantize_q8(aq, sa, asum, x, T, K):
    """x (T*K,) f32 -> aq (T, K/4) int32 words, sa (T, K/32) scale, asum (T, K/32) = sa * sum(q); thread per block."""
    i = cuda.grid(1)
    nb = K // 32
    if i < T * nb:
        t, b = i // nb, i % nb
        o = t * K + 32 * b
        amax = float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[o + j]))
        d = amax / float32(127.0)
        inv = float32(1.0) / d if d != 0 else float32(0.0)
        total = 0
        for w in range(8):
            word = 0
            for j in range(4):
                v = x[o + 4 * w + j] * inv
                q = int(math.floor(abs(v) + 0.5))  # roundf: half away from zero
                q = -q if v < 0 else q
                total += q
                word |= (q & 0xFF) << (8 * j)
            aq[t, 8 * b + w] = word - 4294967296 if word >= 2147483648 else word
        sa[t, b] = d
        asum[t, b] = d * float32(total)
