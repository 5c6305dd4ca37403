"""Attention over the KV cache without dequantizing it: K/V rows are decoded inside the dot products.

Cache types (per layer, rows (n_ctx, G, Dh) flattened):
    f32, f16   values as float32 / float16 arrays
    q8_0       int8 codes + a float32 scale per 32 values: x = d * q, d = max|x| / 127, q = roundf(x / d)
    q4_0       4-bit codes packed as in Q4_0 (value j low nibble of byte j, j + 16 high) + a float32 scale:
               x = d * (q - 8), d = max / -8 (max: the value of largest magnitude), q = trunc(x / d + 8.5)
The quantizers follow pyquant.quants.q8_0 / q4_0, except that the scale stays float32 (Q8_0 and Q4_0 store it
as float16).

`rope_store`: one launch before attention: RoPE on q, RoPE on k and k's rows into the cache, v's rows into the
cache (RoPE left to the backend's pending op until here, so q and k are not written and read back first).

`attend`: a block per (query head, token), 128 threads; keys in chunks of 128, a thread per key for the
scores, an online softmax (running max and sum), then a thread per output dim accumulates p * V (prefill).

`attend1` (decode, one token): a head's keys split over SPLITS blocks (the grid must not depend on the
position: the step is replayed as a graph), each block in chunks of CHUNK keys: a warp takes KB keys at once
with the lanes across the head (coalesced rows, all KB rows' loads out together), an online softmax, then
threads across the value dims (two key groups for heads of 64) accumulate p * V four keys a step. Each split
leaves (max, sum, acc) in scratch; the last block of a head to finish (an atomic count, reset by it) merges.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from .jit import SIM, block_max, block_sum, device, kernel, warp_sum
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


@device
def load_f(c, s, i):
    """Value i of an f32 / f16 cache array."""
    return float32(c[i])


@device
def load_q8_0(c, s, i):
    return s[i // 32] * float32(c[i])


@device
def load_q4_0(c, s, i):
    b = i // 32
    j = i % 32
    return s[b] * float32(np.int32((c[16 * b + j % 16] >> (4 * (j // 16))) & 15) - 8)


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


def attend_kernel(kind: int):
    if kind not in _ATTEND:
        _ATTEND[kind] = _make_attend(kind)
    return _ATTEND[kind]


def _make_attend(kind):
    load = LOADERS[kind]

    @kernel
    def attend(out, q, kc, ks, vc, vs, params, scale, window, H, G, Dk, Dv):
        """out (T, H, Dv) = softmax(scale * q K^T, causal, window) V for q (T, H, Dk); grid (H, T)."""
        red = cuda.shared.array(32, float32)
        sq = cuda.shared.array(MAX_HEAD_DIM, float32)
        sp = cuda.shared.array(THREADS, float32)
        h = cuda.blockIdx.x
        t = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        g = h // (H // G)
        qpos = params[POS0] + t
        start = qpos - window + 1 if window > 0 and qpos - window + 1 > 0 else 0
        for i in range(tid, Dk, THREADS):
            sq[i] = q[(t * H + h) * Dk + i] * scale
        cuda.syncthreads()
        m = float32(-math.inf)
        lsum = float32(0.0)
        acc0 = float32(0.0)
        acc1 = float32(0.0)
        for s0 in range(start, qpos + 1, THREADS):
            s = s0 + tid
            score = float32(-math.inf)
            if s <= qpos:
                base = (s * G + g) * Dk
                score = float32(0.0)
                for i in range(0, Dk, 8):  # eight loads out together (Dk is a multiple of 32)
                    score += (sq[i] * load(kc, ks, base + i) + sq[i + 1] * load(kc, ks, base + i + 1)
                              + sq[i + 2] * load(kc, ks, base + i + 2) + sq[i + 3] * load(kc, ks, base + i + 3)
                              + sq[i + 4] * load(kc, ks, base + i + 4) + sq[i + 5] * load(kc, ks, base + i + 5)
                              + sq[i + 6] * load(kc, ks, base + i + 6) + sq[i + 7] * load(kc, ks, base + i + 7))
            m_new = max(m, block_max(red, score))
            p = math.exp(score - m_new) if s <= qpos else float32(0.0)
            sp[tid] = p
            corr = math.exp(m - m_new)
            lsum = lsum * corr + block_sum(red, p)
            m = m_new
            n = min(THREADS, qpos + 1 - s0)
            acc0 *= corr
            acc1 *= corr
            stride = G * Dv
            for half in range(2):  # dims tid and tid + THREADS; four keys per step, loads issued together
                dim = tid + half * THREADS
                if dim < Dv:
                    a = float32(0.0)
                    base = (s0 * G + g) * Dv + dim
                    j = 0
                    while j + 4 <= n:
                        v0 = load(vc, vs, base)
                        v1 = load(vc, vs, base + stride)
                        v2 = load(vc, vs, base + 2 * stride)
                        v3 = load(vc, vs, base + 3 * stride)
                        a += sp[j] * v0 + sp[j + 1] * v1 + sp[j + 2] * v2 + sp[j + 3] * v3
                        base += 4 * stride
                        j += 4
                    while j < n:
                        a += sp[j] * load(vc, vs, base)
                        base += stride
                        j += 1
                    if half == 0:
                        acc0 += a
                    else:
                        acc1 += a
            cuda.syncthreads()
        o = (t * H + h) * Dv
        if tid < Dv:
            out[o + tid] = acc0 / lsum
        if tid + THREADS < Dv:
            out[o + tid + THREADS] = acc1 / lsum

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

    @kernel
    def attend1(out, q, kc, ks, vc, vs, params, scale, window, H, G, pm, pl, pacc, count):
        """out (1, H, dv) for the token at params[POS0]; grid (H, SPLITS), THREADS threads."""
        sq = cuda.shared.array(MAX_HEAD_DIM, float32)
        sp = cuda.shared.array(CHUNK, float32)
        red = cuda.shared.array(32, float32)
        sacc = cuda.shared.array(MAX_HEAD_DIM, float32)
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
        for i in range(tid, dk, THREADS):
            sq[i] = q[h * dk + i] * scale
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
