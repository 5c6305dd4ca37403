"""Greedy decoding without a host round trip a token: the device argmax (kernels_cuda/argmax.py) against
np.argmax.
"""

from __future__ import annotations

import numpy as np
import pytest

import test_kernels_cuda  # noqa: F401 (the simulator turned on before numba.cuda is imported)


# ---- the argmax kernel -----------------------------------------------------------------------------------


def _vector(kind: str, n: int, rng) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "ties":  # the maximum in several blocks: the first wins
        x = rng.integers(0, 3, n).astype(np.float32)
    elif kind == "last":
        x[-1] = 10.0
    elif kind == "nan":  # np.argmax: the first NaN wins over every number
        x[[n // 2, n - 3]] = np.nan
        x[1] = np.inf
    elif kind == "-inf":
        x[:] = -np.inf
    elif kind == "zeros":  # -0.0 == 0.0: a tie
        x[:] = 0.0
        x[:5] = -0.0
    return x


@pytest.mark.cuda
def test_argmax_step_matches_numpy():
    """Sizes below one block of threads and off every multiple of it, one to BLOCKS blocks; each launch
    writes the token into params slot 1, moves the position on, appends to the ring (which it never
    overruns: the count goes on past its capacity)."""
    from kernels_cuda import argmax as am
    from kernels_cuda.launch import upload

    rng = np.random.default_rng(0)
    cases = [(48, "normal"), (1000, "ties"), (am.BLOCKS * am.THREADS + 37, "last"), (777, "nan"),
             (301, "-inf"), (130, "zeros")]
    scratch = am.scratch()
    params = upload(np.array([5, 0], np.int32))
    ring_all = upload(np.array([0] + [-1] * (len(cases) + 2), np.int32))  # a zero count, then sentinels
    ring = ring_all[: len(cases)]  # room for all but the last token
    want = []
    for n, kind in cases:
        x = _vector(kind, n, rng)
        want.append(int(np.argmax(x)))
        am.argmax_step[am.grid(n)](upload(x), n, params, ring, *scratch)
        assert params.copy_to_host()[1] == want[-1], (n, kind)
    assert am.grid(cases[2][0])[0] == am.BLOCKS and am.grid(48)[0] == 1
    assert params.copy_to_host()[0] == 5 + len(cases)
    got = ring_all.copy_to_host()
    assert got[0] == len(cases) and list(got[1 : len(cases)]) == want[:-1]
    assert list(got[len(cases) :]) == [-1] * 3  # past the ring: untouched
    assert scratch[2].copy_to_host()[0] == 0  # the count is left zeroed for the next launch
