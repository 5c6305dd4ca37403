"""Greedy token choice on the device: argmax over a logits vector, the result fed to the next decode step.

`argmax_step` (grid `grid(n)`, THREADS threads): each block reduces its contiguous slice of x to (max, first
index), the last block to finish (an atomic count it resets, as attention.attend1 merges its splits) merges
the blocks' pairs and then, instead of returning the index to the host:
    params[TOKEN] = index       the token id the next step's embedding (get_rows) reads
    params[POS0] += 1           the next step's position
    ring[1 + ring[0]] = index   the generated tokens (ring[0] counts them; stored while they fit)
    ring[0] += 1
so a recorded decode step followed by this launch can run n times back to back (CudaBackend.replay_greedy).

The rule is np.argmax's: the largest value, ties to the lowest index, and NaN above every number (the first
NaN wins if there is one: np.argmax([1, nan, 3]) == 1). -0.0 and 0.0 are equal (a tie).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32

from .jit import SIM, device, kernel
from .launch import upload
from .ops import POS0

TOKEN = 1  # params slot: the id of the (single) token a decode step embeds
THREADS = 64 if SIM else 256  # a power of two (the tree reduction halves it); the simulator: fewer Python threads
BLOCKS = 4 if SIM else 64  # at most THREADS: the last block merges one pair a thread


@device
def _better(v, i, bv, bi):
    """(v, i) wins over (bv, bi) under np.argmax's rule: NaN first, then larger, then the lower index."""
    if math.isnan(v):
        return not math.isnan(bv) or i < bi
    if math.isnan(bv):
        return False
    return v > bv or (v == bv and i < bi)


@device
def _block_argmax(sv, si, v, i):
    """The winning (value, index) of every thread's pair, in shared sv[0], si[0] (read after the return)."""
    tid = cuda.threadIdx.x
    sv[tid] = v
    si[tid] = i
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if tid < s and _better(sv[tid + s], si[tid + s], sv[tid], si[tid]):
            sv[tid] = sv[tid + s]
            si[tid] = si[tid + s]
        cuda.syncthreads()
        s //= 2


@kernel
def argmax_step(x, n, params, ring, pm, pi, count):
    """argmax of x[:n] into params and ring (module docstring); pm, pi: a (max, index) per block; count: a
    zeroed int32, left zeroed."""
    sv = cuda.shared.array(THREADS, float32)
    si = cuda.shared.array(THREADS, int32)
    last = cuda.shared.array(1, int32)
    tid = cuda.threadIdx.x
    b = cuda.blockIdx.x
    nb = cuda.gridDim.x
    per = (n + nb - 1) // nb
    lo = b * per
    hi = min(lo + per, n)
    bv = float32(-math.inf)
    bi = n  # an index past every value: any value at or above -inf beats it
    for j in range(lo + tid, hi, THREADS):  # increasing j: ties keep the first
        v = x[j]
        if _better(v, j, bv, bi):
            bv, bi = v, j
    _block_argmax(sv, si, bv, bi)
    if tid == 0:
        pm[b] = sv[0]
        pi[b] = si[0]
    cuda.threadfence()
    cuda.syncthreads()  # every thread done with sv before the merge rewrites it
    if tid == 0:
        last[0] = 1 if cuda.atomic.add(count, 0, 1) == nb - 1 else 0
    cuda.syncthreads()
    if last[0] == 1:  # the last block to finish merges the blocks' pairs
        bv = float32(-math.inf)
        bi = n
        if tid < nb:
            bv, bi = pm[tid], pi[tid]
        _block_argmax(sv, si, bv, bi)
        if tid == 0:
            tok = si[0]
            count[0] = 0
            params[TOKEN] = tok
            params[POS0] += 1
            k = ring[0]
            if k < ring.shape[0] - 1:
                ring[1 + k] = tok
            ring[0] = k + 1


def grid(n: int) -> tuple[int, int]:
    """(blocks, threads) of argmax_step over n values: up to BLOCKS blocks, none with less than THREADS values."""
    return (max(1, min(BLOCKS, -(-n // THREADS))), THREADS)


def scratch():
    """(pm, pi, count) of argmax_step for any n: a pair per block and a zeroed count."""
    return (cuda.device_array(BLOCKS, np.float32), cuda.device_array(BLOCKS, np.int32),
            upload(np.zeros(1, np.int32)))
