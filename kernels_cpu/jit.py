"""Decorator presets for every CPU kernel, in one place.

All kernels are compiled once and cached on disk (`cache=True`: the second process start loads machine code
instead of compiling) and release the GIL (`nogil`). Three flavours:

    exact      no fastmath: kernels whose result is promised bit-exact (activation quantizers, KV writes)
    fast       reassociation and contraction allowed: dot products and reductions checked within a tolerance
    parallel   `fast` plus `prange` over disjoint output slices; the thread count is numba's (set_num_threads)
    inline     small helpers inlined into their callers at numba-IR level (literal arguments fold there)
"""

from __future__ import annotations

import numba

FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}

exact = numba.njit(cache=True, nogil=True)
fast = numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
parallel = numba.njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
inline = numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
inline_exact = numba.njit(cache=True, nogil=True, inline="always")


def set_threads(n: int | None) -> int:
    """Use n worker threads (None: every core numba sees); returns the count in effect."""
    n = numba.config.NUMBA_NUM_THREADS if n is None else max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n
