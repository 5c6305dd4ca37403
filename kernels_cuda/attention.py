"""Attention over the KV cache without dequantizing it: K/V rows are decoded inside the dot products.

Cache types (per layer, rows (n_ctx, G, Dh) flattened):
    f32, f16   values as float32 / float16 arrays
    q8_0       int8 codes + a float32 scale per 32 values: x = d * q, d = max|x| / 127, q = roundf(x / d)
    q4_0       4-bit codes packed as in Q4_0 (value j low nibble of byte j, j + 16 high) + a float32 scale:
               x = d * (q - 8), d = max / -8 (max: the value of largest magnitude), q = trunc(x / d + 8.5)
The quantizers follow pyquant.quants.q8_0 / q4_0, except that the scale stays float32 (Q8_0 and Q4_0 store it
as float16).

`rope_store`: one launch before prefill attention: RoPE on q, RoPE on k and k's rows into the cache, v's rows
into the cache (RoPE left to the backend's pending op until here, so q and k are not written and read back
first). A decode token needs no such launch: attend1 does the same at its start (with gemma3's q/k norms).

`attend` (prefill, T > 1): tiled, flash-attention style in float32. The rows (token, query head) of one KV head
are taken token-major, so a block's rows share its K/V tiles (GQA) whatever the heads a KV head; a block takes
`block_rows` of them (default 32 = 4 warps x 8 rows for heads up to 128, 8 = 2 x 4 for wider heads: few query
heads, so smaller tiles keep the grid near two blocks an SM), tiles with the most keys dispatched first. Per key
tile (64 keys / 32 for wide heads, from the first row's window start to the last row's position: tiles no row
sees are never visited) the block stages K and V decoded to float32 in shared memory (together when both fit in
48 KB, else in dim chunks through one buffer); a warp scores its rows against keys lane, lane + 32, .. (Q is
staged once, read as broadcasts; K rows padded a word: conflict-free), keeps a running max and sum per row
(shuffles within the warp, no block barrier), writes P for its rows and accumulates p * V over value dims
lane, lane + 32, .. (each lane owns rows x dims / 32 accumulators in registers). The tile shape is fixed at
compile time per (cache type, dk, dv): `attend_config`, `attend_grid`.

`attend1` (decode, one token): a head's keys split over SPLITS blocks (the grid must not depend on the
position: the step is replayed as a graph), each block in chunks of CHUNK keys: a warp takes KB keys at once
with the lanes across the head (coalesced rows, all KB rows' loads out together), an online softmax, then
threads across the value dims (two key groups for heads of 64) accumulate p * V four keys a step. Each split
leaves (max, sum, acc) in scratch; the last block of a head to finish (an atomic count, reset by it) merges.
Each block normalizes (gemma3) and turns its head's q itself; the blocks whose keys include the token's own
also store the token's K and V rows (identical bytes from every query head of a KV head), then read them
back from the cache after a block barrier: no block reads a row another block writes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import cuda, float32

from .jit import SIM, block_max, block_sum, ceil_div, device, kernel, warp_max, warp_sum
from .launch import upload
from .ops import POS0, rope_val

F32, F16, Q8_0, Q4_0 = range(4)
CACHE_TYPES = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
MAX_HEAD_DIM = 256
THREADS = 128
SPLITS = 8  # blocks a head in decode attention
CHUNK = 16 if SIM else 64  # keys a decode block scores at once (the simulator: reach several chunks cheaply)


def cache_arrays(kind: int, n_values: int):
    """(codes, scales) device arrays holding n_values of one cache type."""
    if kind == F32:
        return cuda.device_array(n_values, np.float32), cuda.device_array(1, np.float32)
    if kind == F16:
        return cuda.device_array(n_values, np.float16), cuda.device_array(1, np.float32)
    codes = cuda.device_array(n_values if kind == Q8_0 else n_values // 2, np.int8 if kind == Q8_0 else np.uint8)
    return codes, cuda.device_array(n_values // 32, np.float32)


# The loaders index with unsigned 64-bit integers: Numba guards a signed index against wraparound (a shift, an and
# and an add an access) and divides signed integers with a sign fixup; cache indices are never negative.
U64, U32 = np.uint64, np.uint32


@device
def load_f(c, s, i):
    """Value i of an f32 / f16 cache array."""
    return float32(c[U64(i)])


@device
def load_q8_0(c, s, i):
    i = U64(i)
    return s[i // U64(32)] * float32(c[i])


@device
def load_q4_0(c, s, i):
    i = U64(i)
    b = i // U64(32)
    j = i % U64(32)
    return s[b] * float32(np.int32((c[U64(16) * b + j % U64(16)] >> (U64(4) * (j // U64(16)))) & U64(15)) - 8)


LOADERS = {F32: load_f, F16: load_f, Q8_0: load_q8_0, Q4_0: load_q4_0}


_ATTEND: dict = {}
_ROPE_STORE: dict = {}


def rope_store_kernel(kind: int):
    if kind not in _ROPE_STORE:
        _ROPE_STORE[kind] = _make_rope_store(kind)
    return _ROPE_STORE[kind]


@device
def _kv(x, i, rot, cos, sin, p, hd, n_rot, neox):
    """x[i], or with rot, x[i] turned by RoPE at position p (heads of hd values)."""
    if rot:
        return rope_val(x, cos, sin, p, i - i % hd, i % hd, n_rot, neox)
    return x[i]


def kv_per_thread(kind: int) -> int:
    """Cache values one rope_store thread writes: 1 (f32, f16), or one scaled block of 32 (q8_0, q4_0)."""
    return 1 if kind in (F32, F16) else 32


def _make_rope_store(kind):
    store32 = _store32_fn(kind)
    per = kv_per_thread(kind)

    @kernel
    def rope_store(qy, q, kc, ks, k, vc, vs, v, cos, sin, params, T, H, G, Dk, Dv, n_rot, neox, rot):
        """One launch before attention: with rot, qy = RoPE(q) (T, H, Dk), a thread per value; K rows (T, G, Dk),
        turned when rot, and V rows (T, G, Dv) into the cache at rows params[POS0].., a thread per value or per
        block of 32 (kv_per_thread)."""
        i = cuda.grid(1)
        nq = T * H * Dk if rot else 0
        nk = T * G * Dk // per
        p0 = params[POS0]
        if i < nq:
            qy[i] = rope_val(q, cos, sin, p0 + i // (H * Dk), i - i % Dk, i % Dk, n_rot, neox)
            return
        i -= nq
        if i < nk:
            o = per * i
            p = p0 + o // (G * Dk)
            if per == 1:
                kc[p0 * G * Dk + o] = _kv(k, o, rot, cos, sin, p, Dk, n_rot, neox)
            else:
                store32(kc, ks, p0 * G * Dk + o, k, o, rot, cos, sin, p, Dk, n_rot, neox)
        elif i - nk < T * G * Dv // per:
            o = per * (i - nk)
            if per == 1:
                vc[p0 * G * Dv + o] = v[o]
            else:
                store32(vc, vs, p0 * G * Dv + o, v, o, False, cos, sin, p0, Dv, n_rot, neox)

    return rope_store


def _store32_fn(kind):
    @device
    def store32(c, s, dst, x, o, rot, cos, sin, p, hd, n_rot, neox):
        """Cache values dst..dst+31 = x[o..o+31] (through _kv) in the cache's type; a scale per 32 values for
        q8_0 (d = max|x| / 127, q = roundf(x / d)) and q4_0 (d = max / -8, q = trunc(x / d + 8.5))."""
        if kind == F32 or kind == F16:
            for j in range(32):
                c[dst + j] = _kv(x, o + j, rot, cos, sin, p, hd, n_rot, neox)
        elif kind == Q8_0:
            amax = float32(0.0)
            for j in range(32):
                amax = max(amax, abs(_kv(x, o + j, rot, cos, sin, p, hd, n_rot, neox)))
            d = amax / float32(127.0)
            inv = float32(1.0) / d if d != 0 else float32(0.0)
            for j in range(32):
                val = _kv(x, o + j, rot, cos, sin, p, hd, n_rot, neox) * inv
                qv = int(math.floor(abs(val) + 0.5))
                c[dst + j] = -qv if val < 0 else qv
            s[dst // 32] = d
        else:
            amax = float32(0.0)
            vmax = float32(0.0)
            for j in range(32):
                val = _kv(x, o + j, rot, cos, sin, p, hd, n_rot, neox)
                if abs(val) > amax:
                    amax = abs(val)
                    vmax = val
            d = vmax / float32(-8.0)
            inv = float32(1.0) / d if d != 0 else float32(0.0)
            for j in range(16):
                q0 = min(int(_kv(x, o + j, rot, cos, sin, p, hd, n_rot, neox) * inv + float32(8.5)), 15)
                q1 = min(int(_kv(x, o + j + 16, rot, cos, sin, p, hd, n_rot, neox) * inv + float32(8.5)), 15)
                c[dst // 2 + j] = q0 | (q1 << 4)
            s[dst // 32] = d

    return store32


SMEM_FLOATS = 12288  # 48 KB of static shared memory a block, in floats
STAGE_BATCH = 16  # cache values a thread loads before storing them to shared memory


class AttendConfig(NamedTuple):
    """Tile shape of the prefill kernel (compile time). A block is `warps` warps, each owning `rows` query
    rows; a key tile is `bk` keys (bk / 32 a lane). K is staged `dkc` dims at a time and V `dvc` dims at a
    time; `together`: the whole K and V tiles fit at once (one staging phase a tile, P then reuses K's space),
    else K chunks and then V chunks go through one buffer, each chunk a phase."""

    warps: int
    rows: int
    bk: int
    dkc: int
    dvc: int
    together: bool

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def block_rows(self) -> int:
        return self.warps * self.rows

    def smem_floats(self, dk: int) -> int:
        br = self.block_rows
        if self.together:
            return br * dk + max(self.bk * (dk + 1), br * self.bk) + self.bk * self.dvc
        return br * dk + max(self.bk * (self.dkc + 1), self.bk * self.dvc) + br * self.bk


def attend_config(dk: int, dv: int, warps: int | None = None, rows: int | None = None, bk: int | None = None,
                  chunks: tuple[int, int] | None = None) -> AttendConfig:
    """The tile shape for heads of dk / dv (each a multiple of 32, at most MAX_HEAD_DIM); the arguments given
    override the defaults (the bench sweeps them; `chunks` = (dkc, dvc) forces the chunked staging). Defaults:
    heads up to 128 wide take 4 warps x 8 rows and 64-key tiles (a lane's micro-tiles: 8 rows x 2 keys, 8 rows
    x 2 dims: 10 shared loads for 16 FMAs); wider heads take 2 warps x 4 rows (few query heads: keep the grid
    large) and 32-key tiles."""
    small = max(dk, dv) <= 128
    warps = warps or (4 if small else 2)
    rows = rows or (8 if small else 4)
    bk = bk or (64 if small else 32)
    if dk % 32 or dv % 32 or max(dk, dv) > MAX_HEAD_DIM or bk % 32 or bk > 256:
        raise ValueError(f"attend: heads {dk}/{dv}, key tile {bk}")
    cfg = AttendConfig(warps, rows, bk, dk, dv, True)
    if chunks:
        cfg = AttendConfig(warps, rows, bk, *chunks, False)
        if dk % cfg.dkc or dv % cfg.dvc or cfg.dkc % 32 or cfg.dvc % 32 or cfg.smem_floats(dk) > SMEM_FLOATS:
            raise ValueError(f"attend: chunks {chunks} of heads {dk}/{dv}")
        return cfg
    if cfg.smem_floats(dk) <= SMEM_FLOATS:
        return cfg
    # chunked: the largest chunks (dims dividing the head, multiples of 32) whose stage fits beside Q and P
    room = SMEM_FLOATS - warps * rows * (dk + bk)
    dkc = max((c for c in range(32, dk + 1, 32) if dk % c == 0 and bk * (c + 1) <= room), default=0)
    dvc = max((c for c in range(32, dv + 1, 32) if dv % c == 0 and bk * c <= room), default=0)
    if not dkc or not dvc:
        raise ValueError(f"attend: no tiling of heads {dk}/{dv} in {warps} x {rows} rows, {bk}-key tiles")
    return AttendConfig(warps, rows, bk, dkc, dvc, False)


def attend_grid(n_head: int, n_head_kv: int, t: int, dk: int, dv: int, cfg: AttendConfig | None = None):
    """(grid, threads) of attend_kernel(kind, dk, dv) for t query tokens: a block per `block_rows` rows of
    one KV head's (token, query head) rows, by KV head."""
    cfg = cfg or attend_config(dk, dv)
    return (n_head_kv, ceil_div(t * (n_head // n_head_kv), cfg.block_rows)), cfg.threads


def attend_kernel(kind: int, dk: int, dv: int, cfg: AttendConfig | None = None):
    cfg = cfg or attend_config(dk, dv)
    key = (kind, dk, dv, cfg)
    if key not in _ATTEND:
        _ATTEND[key] = _make_attend(kind, dk, dv, cfg)
    return _ATTEND[key]


@device
def _row(r, hg, H, g):
    """Row (token, query head) of q / out for row r of KV head g's rows (token-major, hg query heads a KV
    head); 32-bit division (a 64-bit one is a long emulated sequence)."""
    t = U32(r) // U32(hg)
    return np.int64(t) * H + g * hg + np.int64(U32(r) - t * U32(hg))


if SIM:

    @device
    def _syncwarp():
        cuda.syncthreads()  # the simulator has no syncwarp; every thread reaches this point

else:

    @device
    def _syncwarp():
        cuda.syncwarp()


def _make_attend(kind, dk, dv, cfg):
    load = LOADERS[kind]
    nt, rq, bk = cfg.threads, cfg.rows, cfg.bk
    br = cfg.block_rows
    rk = bk // 32  # keys a lane scores
    ndv = dv // 32  # value dims a lane accumulates (over all V chunks)
    dkc, dvc, together = cfg.dkc, cfg.dvc, cfg.together
    nkc, nvc = dk // dkc, dv // dvc
    rdc = dvc // 32  # value dims a lane takes in one V chunk
    ks_ = dkc + 1  # K rows padded one word: lanes reading key rows lane, lane + 32, .. at one dim hit 32 banks
    n_sq = br * dk
    n_buf = max(bk * ks_, br * bk, bk * dvc) if together else max(bk * ks_, bk * dvc)
    n_sv = bk * dvc if together else 1
    n_sp = 1 if together else br * bk
    k_per = bk * dkc // nt  # staging: values a thread loads per K / V chunk
    v_per = bk * dvc // nt
    pair = 2 if kind in (Q8_0, Q4_0) else 1  # values a staging thread takes at once
    n_acc, n_sc = rq * ndv, rq * rk  # local array sizes must be constants, not expressions
    # dims (scores) / keys (P.V) a loop step, about 64 FMAs a step: fewer steps pay the address and loop
    # arithmetic less often; larger bodies were left rolled by LLVM (the accumulators then go to local memory)
    us = min(8, max(1, 64 // (rq * rk)))
    uv = min(4, max(1, 64 // (rq * rdc)))
    us, uv = 1 << (us.bit_length() - 1), 1 << (uv.bit_length() - 1)  # powers of two: they divide 32

    @device
    def slot(step, tid, DC):
        """(row, dim) of the value (pair) a staging thread takes at a step."""
        e = U64(step * nt + tid)
        kr = e // U64(DC // pair)
        d = e % U64(DC // pair)
        if pair == 2:
            d = (d // U64(16)) * U64(32) + d % U64(16)
        return kr, d

    @device
    def stage(buf, stride, c, s, key0, kend, G, g, D, dc0, DC, per):
        """buf[r * stride + d] = value dc0 + d of cache row key0 + r (d < DC, r < bk), zero past kend (rows never
        written: garbage times p = 0 could still be NaN). Consecutive threads take consecutive dims of a row
        (coalesced); a thread's loads go out STAGE_BATCH at a time before its stores (registers, not the latency
        of one load after another). q4_0: a thread takes values d and d + 16 of a block, the two nibbles of one
        byte (one byte and one scale load for both once LLVM merges the loaders' identical loads)."""
        tid = cuda.threadIdx.x
        nb = min(per // pair, STAGE_BATCH // pair)  # pairs
        for b0 in range(0, per // pair, nb):
            vals = cuda.local.array(STAGE_BATCH, float32)
            vals2 = cuda.local.array(STAGE_BATCH, float32)
            for it in range(nb):
                kr, d = slot(b0 + it, tid, DC)
                key = key0 + np.int64(kr)
                i = (min(key, kend) * G + g) * D + dc0 + np.int64(d)  # a row that exists: loads need no branch
                v0 = load(c, s, i)
                vals[it] = v0 if key <= kend else float32(0.0)
                if pair == 2:
                    v1 = load(c, s, i + 16)
                    vals2[it] = v1 if key <= kend else float32(0.0)
            for it in range(nb):
                kr, d = slot(b0 + it, tid, DC)
                buf[kr * U64(stride) + d] = vals[it]
                if pair == 2:
                    buf[kr * U64(stride) + d + U64(16)] = vals2[it]

    @kernel
    def attend(out, q, kc, ks, vc, vs, params, scale, window, H, G, T):
        """out (T, H, dv) = softmax(scale * q K^T, causal, window) V for q (T, H, dk) at positions params[POS0]..;
        grid attend_grid(H, G, T, dk, dv). The rows (token, query head) of KV head g, token-major, in tiles of
        br: a warp owns rq rows; per key tile the lanes score 32 keys apart (rk each) against Q staged in
        shared memory, an online softmax per row within the warp, then the lanes accumulate p * V over their
        value dims (ndv each)."""
        sq = cuda.shared.array(n_sq, float32)
        sbuf = cuda.shared.array(n_buf, float32)
        sv = cuda.shared.array(n_sv, float32)
        sp0 = cuda.shared.array(n_sp, float32)
        sp = sbuf if together else sp0  # P over K's stage once the scores are done (a barrier between)
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        g = cuda.blockIdx.x  # KV head fastest: both heads' heaviest tiles are dispatched first
        hg = U32(H // G)
        n_rows = T * hg
        tile = cuda.gridDim.y - 1 - cuda.blockIdx.y  # the tiles with the most keys first (the tail is short)
        r0 = tile * br
        pos0 = params[POS0]
        # stage q * scale; rows past the last are zero (computed, never stored)
        for e in range(tid, n_sq, nt):
            r = r0 + e // dk
            sq[e] = q[_row(r, hg, H, g) * dk + e % dk] * scale if r < n_rows else float32(0.0)
        qpos = cuda.local.array(rq, np.int32)
        m = cuda.local.array(rq, float32)
        lsum = cuda.local.array(rq, float32)
        acc = cuda.local.array(n_acc, float32)
        wr0 = r0 + warp * rq
        for i in range(rq):
            qpos[i] = pos0 + np.int64(U32(min(wr0 + i, n_rows - 1)) // hg)
            m[i] = -math.inf
            lsum[i] = 0.0
            for j in range(ndv):
                acc[i * ndv + j] = 0.0
        kend = pos0 + np.int64(U32(min(r0 + br, n_rows) - 1) // hg)  # the block's last visible key
        qfirst = pos0 + np.int64(U32(r0) // hg)
        kbeg = qfirst - window + 1 if window > 0 and qfirst - window + 1 > 0 else 0
        wend = qpos[rq - 1]  # this warp's last visible key
        sc = cuda.local.array(n_sc, float32)
        for k0 in range(kbeg, kend + 1, bk):
            for i in range(rq * rk):
                sc[i] = 0.0
            for kci in range(nkc):
                if together:
                    stage(sbuf, ks_, kc, ks, k0, kend, G, g, dk, 0, dk, k_per)
                    stage(sv, dvc, vc, vs, k0, kend, G, g, dv, 0, dv, v_per)
                else:
                    stage(sbuf, ks_, kc, ks, k0, kend, G, g, dk, kci * dkc, dkc, k_per)
                cuda.syncthreads()
                for d0 in range(0, dkc, us):  # us dims a step: constant offsets from one address
                    for u in range(us):
                        d = U64(d0) + U64(u)
                        kv = cuda.local.array(8, float32)
                        for j in range(rk):
                            kv[j] = sbuf[U64((lane + 32 * j) * ks_) + d]
                        for i in range(rq):
                            qv = sq[U64((warp * rq + i) * dk + kci * dkc) + d]  # one word for the whole warp
                            for j in range(rk):
                                sc[i * rk + j] += qv * kv[j]
                cuda.syncthreads()  # every warp reads K's stage: all done before it is overwritten
            # online softmax, a row at a time across the warp's lanes
            for i in range(rq):
                qp = qpos[i]
                mx = float32(-math.inf)
                for j in range(rk):
                    key = k0 + lane + 32 * j
                    vis = key <= qp and (window <= 0 or qp - key < window)
                    v = sc[i * rk + j] if vis else float32(-math.inf)
                    sc[i * rk + j] = v
                    mx = max(mx, v)
                m_new = max(m[i], warp_max(mx))
                mu = m_new if m_new != -math.inf else float32(0.0)  # nothing visible yet: p = 0, no NaN
                corr = math.exp(m[i] - mu)
                m[i] = m_new
                ps = float32(0.0)
                for j in range(rk):
                    p = math.exp(sc[i * rk + j] - mu)
                    sc[i * rk + j] = p
                    ps += p
                lsum[i] = lsum[i] * corr + ps  # a lane's share; summed over the warp at the end
                for j in range(ndv):
                    acc[i * ndv + j] *= corr
            for i in range(rq):
                for j in range(rk):
                    sp[U64((warp * rq + i) * bk + lane + 32 * j)] = sc[i * rk + j]
            _syncwarp()  # P of a row is read by all lanes of its warp
            # keys this warp's rows can see in the tile, up to a multiple of uv (p = 0 past them, and those V rows
            # are staged: real or zero)
            kn = min(bk, (wend + uv - k0) // uv * uv)
            for vci in range(nvc):
                if not together:
                    stage(sbuf, dvc, vc, vs, k0, kend, G, g, dv, vci * dvc, dvc, v_per)
                    cuda.syncthreads()
                vb = sv if together else sbuf
                for k1 in range(0, kn, uv):
                    for u in range(uv):
                        kk = U64(k1) + U64(u)
                        vv = cuda.local.array(8, float32)
                        for jd in range(rdc):
                            vv[jd] = vb[kk * U64(dvc) + U64(lane + 32 * jd)]
                        for i in range(rq):
                            pv = sp[U64((warp * rq + i) * bk) + kk]  # one word for the whole warp
                            for jd in range(rdc):
                                acc[i * ndv + vci * rdc + jd] += pv * vv[jd]
                cuda.syncthreads()  # the stages (and P) are overwritten next
        for i in range(rq):
            tot = warp_sum(lsum[i])
            r = wr0 + i
            if r < n_rows:
                o = _row(r, hg, H, g) * dv
                for j in range(ndv):
                    out[o + lane + 32 * j] = acc[i * ndv + j] / tot

    return attend


_ATTEND1: dict = {}


def attend1_kernel(kind: int, dk: int, dv: int):
    key = (kind, dk, dv)
    if key not in _ATTEND1:
        _ATTEND1[key] = _make_attend1(kind, dk, dv)
    return _ATTEND1[key]


def attend1_scratch(n_head: int, dv: int):
    """(pm, pl, pacc, count) of attend1: per (head, split) max, sum and accumulator; per head a zeroed count."""
    return (cuda.device_array(n_head * SPLITS, np.float32), cuda.device_array(n_head * SPLITS, np.float32),
            cuda.device_array(n_head * SPLITS * dv, np.float32), upload(np.zeros(n_head, np.int32)))


def _make_attend1(kind, dk, dv):
    load = LOADERS[kind]
    lane_dims = dk // 32  # K values a lane reads of each key
    kb = max(1, 8 // lane_dims)  # keys a warp scores at once: 8 loads a lane in flight
    groups = 2 if dv <= THREADS // 2 else 1  # key groups of the p * V sums
    gthreads = THREADS // groups
    vdims = -(-dv // gthreads)  # value dims a thread accumulates (1 or 2)

    store32 = _store32_fn(kind)
    kv_per = kv_per_thread(kind)

    @kernel
    def attend1(out, q, kc, ks, vc, vs, params, scale, window, H, G, pm, pl, pacc, count, knew, vnew, cos, sin,
                n_rot, neox, rot, qnw, knw, eps, norm):
        """out (1, H, dv) for the token at params[POS0]; grid (H, SPLITS), THREADS threads. The token's q, k
        (G, dk) and v (G, dv) come as the projections left them (turned by RoPE here when rot): every block
        whose keys include the token's own stores its K and V rows into the cache first, as rope_store would
        (the same bytes from each of a KV head's query heads), and reads them back after a block barrier. With
        norm, q and k are first RMS-normalized per head with weights qnw, knw (dk,) (gemma3's q/k norms)."""
        sq = cuda.shared.array(MAX_HEAD_DIM, float32)
        sp = cuda.shared.array(CHUNK, float32)
        red = cuda.shared.array(32, float32)
        sacc = cuda.shared.array(MAX_HEAD_DIM, float32)
        skn = cuda.shared.array(MAX_HEAD_DIM, float32)
        last = cuda.shared.array(1, np.int32)
        h = cuda.blockIdx.x
        sid = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        g = h // (H // G)
        qpos = params[POS0]
        start = qpos - window + 1 if window > 0 and qpos - window + 1 > 0 else 0
        per = (qpos + 1 - start + SPLITS - 1) // SPLITS
        k0 = start + sid * per
        k1 = min(k0 + per, qpos + 1)
        store = k0 <= qpos and qpos < k1  # this block's keys include the token's own: it stores K and V
        if norm:  # q (and k) normalized in shared memory, then turned from there
            ssq = float32(0.0)
            ssk = float32(0.0)
            for i in range(tid, dk, THREADS):
                val = q[h * dk + i]
                sacc[i] = val
                ssq += val * val
                if store:
                    val = knew[g * dk + i]
                    skn[i] = val
                    ssk += val * val
            rq = float32(1.0 / math.sqrt(block_sum(red, ssq) / dk + eps))
            rk = float32(1.0 / math.sqrt(block_sum(red, ssk) / dk + eps))
            for i in range(tid, dk, THREADS):
                sacc[i] = sacc[i] * rq * qnw[i]
                if store:
                    skn[i] = skn[i] * rk * knw[i]
            cuda.syncthreads()
            for i in range(tid, dk, THREADS):
                sq[i] = _kv(sacc, i, rot, cos, sin, qpos, dk, n_rot, neox) * scale
        else:
            for i in range(tid, dk, THREADS):
                sq[i] = _kv(q, h * dk + i, rot, cos, sin, qpos, dk, n_rot, neox) * scale
        if store:
            for i in range(tid, (dk + dv) // kv_per, THREADS):
                if i < dk // kv_per:
                    dst = (qpos * G + g) * dk + kv_per * i
                    if norm:
                        if kv_per == 1:
                            kc[dst] = _kv(skn, i, rot, cos, sin, qpos, dk, n_rot, neox)
                        else:
                            store32(kc, ks, dst, skn, kv_per * i, rot, cos, sin, qpos, dk, n_rot, neox)
                    elif kv_per == 1:
                        kc[dst] = _kv(knew, g * dk + i, rot, cos, sin, qpos, dk, n_rot, neox)
                    else:
                        store32(kc, ks, dst, knew, g * dk + kv_per * i, rot, cos, sin, qpos, dk, n_rot, neox)
                else:
                    o = g * dv + kv_per * (i - dk // kv_per)
                    dst = (qpos * G + g) * dv + kv_per * (i - dk // kv_per)
                    if kv_per == 1:
                        vc[dst] = vnew[o]
                    else:
                        store32(vc, vs, dst, vnew, o, False, cos, sin, qpos, dv, n_rot, neox)
        cuda.syncthreads()
        m = float32(-math.inf)
        lsum = float32(0.0)
        acc0 = float32(0.0)
        acc1 = float32(0.0)
        grp = tid // gthreads
        dim0 = tid % gthreads
        for c0 in range(k0, k1, CHUNK):
            cn = min(CHUNK, k1 - c0)
            # a warp kb keys at once, lanes across the head (the simulator's warp_sum is a block barrier: every
            # warp runs the whole chunk there)
            for j0 in range(warp * kb, CHUNK if SIM else cn, 4 * kb):
                part = cuda.local.array(8, float32)
                for b in range(kb):
                    part[b] = float32(0.0)
                for i in range(lane_dims):
                    qi = sq[lane + 32 * i]
                    for b in range(kb):
                        kr = min(c0 + j0 + b, k1 - 1)
                        part[b] += qi * load(kc, ks, (kr * G + g) * dk + lane + 32 * i)
                for b in range(kb):
                    sc = warp_sum(part[b])
                    if lane == 0 and j0 + b < CHUNK:
                        sp[j0 + b] = sc if j0 + b < cn else float32(-math.inf)
            cuda.syncthreads()
            v = sp[tid] if tid < cn else float32(-math.inf)
            m_new = max(m, block_max(red, v))
            p = math.exp(v - m_new) if tid < cn else float32(0.0)
            if tid < CHUNK:
                sp[tid] = p
            corr = math.exp(m - m_new)
            lsum = lsum * corr + block_sum(red, p)
            m = m_new
            acc0 *= corr
            acc1 *= corr
            stride = G * dv
            for vd in range(vdims):
                dim = dim0 + vd * gthreads
                if dim < dv:
                    a = float32(0.0)
                    base = (c0 * G + g) * dv + dim
                    j = grp
                    while j + 3 * groups < cn:  # four keys a step, loads issued together
                        a += (sp[j] * load(vc, vs, base + j * stride)
                              + sp[j + groups] * load(vc, vs, base + (j + groups) * stride)
                              + sp[j + 2 * groups] * load(vc, vs, base + (j + 2 * groups) * stride)
                              + sp[j + 3 * groups] * load(vc, vs, base + (j + 3 * groups) * stride))
                        j += 4 * groups
                    while j < cn:
                        a += sp[j] * load(vc, vs, base + j * stride)
                        j += groups
                    if vd == 0:
                        acc0 += a
                    else:
                        acc1 += a
            cuda.syncthreads()
        if groups == 2:  # the second key group's sums onto the first's
            if grp == 1 and dim0 < dv:
                sacc[dim0] = acc0
            cuda.syncthreads()
            if grp == 0 and dim0 < dv:
                acc0 += sacc[dim0]
        o = h * SPLITS + sid
        if tid == 0:
            pm[o] = m
            pl[o] = lsum
        if grp == 0:
            for vd in range(vdims):
                dim = dim0 + vd * gthreads
                if dim < dv:
                    pacc[o * dv + dim] = acc0 if vd == 0 else acc1
        cuda.threadfence()
        cuda.syncthreads()
        if tid == 0:
            last[0] = 1 if cuda.atomic.add(count, h, 1) == SPLITS - 1 else 0
        cuda.syncthreads()
        if last[0] == 1:  # the last split of head h to finish merges them all
            mm = float32(-math.inf)
            for s2 in range(SPLITS):
                mm = max(mm, pm[h * SPLITS + s2])
            tot = float32(0.0)
            for s2 in range(SPLITS):
                tot += pl[h * SPLITS + s2] * math.exp(pm[h * SPLITS + s2] - mm)
            for dim in range(tid, dv, THREADS):
                a = float32(0.0)
                for s2 in range(SPLITS):
                    a += pacc[(h * SPLITS + s2) * dv + dim] * math.exp(pm[h * SPLITS + s2] - mm)
                out[h * dv + dim] = a / tot
            if tid == 0:
                count[h] = 0

    return attend1
