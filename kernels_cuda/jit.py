"""Decorator presets and the few device helpers every CUDA kernel shares.

Kernels run for real through numba-cuda on an NVIDIA GPU, or in numba's CUDA simulator when
NUMBA_ENABLE_CUDASIM=1 (CI: no GPU). The simulator lacks warp shuffles and PTX, so the
helpers here pick their implementation once, at import, from `SIM`; both compute the same function.

    kernel   a @cuda.jit kernel (no fastmath: results are checked against float64 within a tolerance,
             and the integer kernels are exact)
    device   a @cuda.jit device function (inlined by LLVM into its callers)

Reductions: `warp_sum` / `warp_max` reduce over the 32 lanes of a warp, `group_max` / `group_isum` (an int32
sum) over each group of g lanes (g a power of two up to 32); every thread of the block must call them the
same number of times (the simulator's versions use a barrier).
"""

from __future__ import annotations

import math

from numba import config, cuda

SIM = bool(config.ENABLE_CUDASIM)
WARP = 32

kernel = cuda.jit
device = cuda.jit(device=True)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


if SIM:
    import contextlib
    import threading

    import numba.cuda.simulator.kernel as _sim_kernel

    _device_swaps: list = []  # (module globals, the real names) swapped by device functions this launch

    @contextlib.contextmanager
    def _swapped_cuda_module(fn, fake_cuda_module):
        """The simulator's swap of `cuda` in a function's module for the launch's fake module, except that a
        device function's swap lasts until the launch ends: numba's own swap restores the real module when a
        block thread leaves a device function of another module, while the block's other threads may still be
        inside that module's functions, and they then fail on `cuda.threadIdx` (seen once in CI, in
        attend1's calls of warp_sum). (A lock and a count of the threads inside made the simulator ~30x
        slower: 256 threads contend for it under the GIL.)"""
        from numba import cuda as real  # not this module's `cuda`: it is swapped too

        g = fn.__globals__
        orig = {k: v for k, v in g.items() if v is real}
        g.update(dict.fromkeys(orig, fake_cuda_module))
        if isinstance(threading.current_thread(), _sim_kernel.BlockThread):
            if orig:
                _device_swaps.append((g, orig))
            yield
            return
        try:  # the launch itself, on the host thread: restore everything when it ends
            yield
        finally:
            g.update(orig)
            while _device_swaps:
                dg, dorig = _device_swaps.pop()
                dg.update(dorig)

    _sim_kernel.swapped_cuda_module = _swapped_cuda_module

    @device
    def warp_sum(v):
        buf = cuda.shared.array(1024, dtype="float32")
        tid = cuda.threadIdx.x + cuda.threadIdx.y * cuda.blockDim.x
        buf[tid] = v
        cuda.syncthreads()
        base = tid - tid % 32
        s = 0.0
        for i in range(32):
            s += buf[base + i]
        cuda.syncthreads()
        return s

    @device
    def warp_max(v):
        buf = cuda.shared.array(1024, dtype="float32")
        tid = cuda.threadIdx.x + cuda.threadIdx.y * cuda.blockDim.x
        buf[tid] = v
        cuda.syncthreads()
        base = tid - tid % 32
        m = buf[base]
        for i in range(1, 32):
            m = max(m, buf[base + i])
        cuda.syncthreads()
        return m

    @device
    def group_max(v, g):
        buf = cuda.shared.array(1024, dtype="float32")
        tid = cuda.threadIdx.x + cuda.threadIdx.y * cuda.blockDim.x
        buf[tid] = v
        cuda.syncthreads()
        base = tid - tid % g
        m = buf[base]
        for i in range(1, g):
            m = max(m, buf[base + i])
        cuda.syncthreads()
        return m

    @device
    def group_isum(v, g):
        buf = cuda.shared.array(1024, dtype="int32")
        tid = cuda.threadIdx.x + cuda.threadIdx.y * cuda.blockDim.x
        buf[tid] = v
        cuda.syncthreads()
        base = tid - tid % g
        s = 0
        for i in range(g):
            s += buf[base + i]
        cuda.syncthreads()
        return s

else:

    @device
    def warp_sum(v):
        for m in (16, 8, 4, 2, 1):
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, m)
        return v

    @device
    def warp_max(v):
        for m in (16, 8, 4, 2, 1):
            v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, m))
        return v

    @device
    def group_max(v, g):
        m = 1
        while m < g:
            v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, m))
            m *= 2
        return v

    @device
    def group_isum(v, g):
        m = 1
        while m < g:
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, m)
            m *= 2
        return v


@device
def block_sum(buf, v):
    """Sum of v over the whole block (1-D block of whole warps, at most 32 warps); buf: shared float32 (32,)."""
    tid = cuda.threadIdx.x
    v = warp_sum(v)
    if tid % 32 == 0:
        buf[tid // 32] = v
    cuda.syncthreads()
    s = 0.0
    for i in range(cuda.blockDim.x // 32):
        s += buf[i]
    cuda.syncthreads()
    return s


@device
def block_max(buf, v):
    """Max of v over the whole block; buf: shared float32 (32,)."""
    tid = cuda.threadIdx.x
    v = warp_max(v)
    if tid % 32 == 0:
        buf[tid // 32] = v
    cuda.syncthreads()
    m = buf[0]
    for i in range(1, cuda.blockDim.x // 32):
        m = max(m, buf[i])
    cuda.syncthreads()
    return m


@device
def silu(g):
    return g / (1.0 + math.exp(-g))


@device
def gelu_tanh(g):
    return 0.5 * g * (1.0 + math.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
