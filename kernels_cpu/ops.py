"""Fused small ops: RMSNorm, rotary embeddings (normal and NeoX), SiLU- and GELU(tanh)-gated units.

Each is one pass over its input, written into a preallocated output. Shapes: rows of D values
(x (R, D) C-contiguous float32); rope works on (T, H, Dh). Sources: ggml's ggml_compute_forward_rms_norm,
rope_yarn (ggml-cpu/ops.cpp) without YaRN, and the reference formulas in pyquant.backend.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from .jit import fast, inline, parallel
from .simd import fadd, fdiv, fexp, ffma, fload, fmul, fsplat, fstore, fsub, fsum, fzero

GELU_C = math.sqrt(2.0 / math.pi)
CHUNK = 2048  # elements per parallel work item of the gated units


@inline
def _sum_squares(x):
    n16 = x.shape[0] // 16 * 16
    a = fzero()
    for i in range(0, n16, 16):
        v = fload(x, i)
        a = ffma(v, v, a)
    s = fsum(a)
    for i in range(n16, x.shape[0]):
        s += x[i] * x[i]
    return s


@fast
def rms_norm(out, x, w, eps):
    """out[r] = x[r] / sqrt(mean(x[r]**2) + eps) * w, for every row r of x (R, D); w (D,)."""
    d = x.shape[1]
    for r in range(x.shape[0]):
        xr, o = x[r], out[r]
        scale = np.float32(1.0) / np.sqrt(_sum_squares(xr) / np.float32(d) + np.float32(eps))
        for i in range(d):
            o[i] = xr[i] * scale * w[i]


@fast
def rope(out, x, cos, sin, n_rot, neox):
    """Rotate the first n_rot dims of every head of x (T, H, Dh) by the angles of cos/sin (T, n_rot/2).
    NeoX pairs dims (i, i + n_rot/2); normal (GPT-J) rope pairs (2i, 2i+1). Dims past n_rot are copied."""
    half = n_rot // 2
    for t in range(x.shape[0]):
        c, s = cos[t], sin[t]
        for h in range(x.shape[1]):
            xi, o = x[t, h], out[t, h]
            for i in range(half):
                ia, ib = (i, i + half) if neox else (2 * i, 2 * i + 1)
                a, b = xi[ia], xi[ib]
                o[ia] = a * c[i] - b * s[i]
                o[ib] = a * s[i] + b * c[i]
            for i in range(n_rot, x.shape[2]):
                o[i] = xi[i]


@inline
def _silu16(g):
    return fdiv(g, fadd(fsplat(1.0), fexp(fmul(g, fsplat(-1.0)))))


@inline
def _gelu16(g):
    # 0.5 g (1 + tanh(u)) = g - g / (exp(2u) + 1), u = c (g + 0.044715 g^3)
    u = fmul(fsplat(2.0 * GELU_C), ffma(fmul(fmul(g, g), g), fsplat(0.044715), g))
    return fsub(g, fdiv(g, fadd(fexp(u), fsplat(1.0))))


@inline
def _gated_chunk(out, gate, up, lo, hi, kind):
    """out[lo:hi] = act(gate) * up, act = silu (kind 0) or gelu_tanh (kind 1)."""
    n16 = lo + (hi - lo) // 16 * 16
    for i in range(lo, n16, 16):
        g = fload(gate, i)
        a = _silu16(g) if kind == 0 else _gelu16(g)
        fstore(out, i, fmul(a, fload(up, i)))
    for i in range(n16, hi):
        g = gate[i]
        if kind == 0:
            a = g / (np.float32(1.0) + np.exp(-g))
        else:
            u = np.float32(GELU_C) * (g + np.float32(0.044715) * g * g * g)
            a = np.float32(0.5) * g * (np.float32(1.0) + np.tanh(u))
        out[i] = a * up[i]


@parallel
def swiglu(out, gate, up):
    """out = silu(gate) * up over flat float32 arrays, chunks split across threads."""
    n = gate.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        _gated_chunk(out, gate, up, c * CHUNK, min(n, (c + 1) * CHUNK), 0)


@parallel
def geglu(out, gate, up):
    """out = gelu_tanh(gate) * up over flat float32 arrays (Gemma's gated GELU), chunks split across threads."""
    n = gate.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        _gated_chunk(out, gate, up, c * CHUNK, min(n, (c + 1) * CHUNK), 1)


@fast
def swiglu_serial(out, gate, up):
    """swiglu on the calling thread (a decode step's few thousand values: no parallel region)."""
    _gated_chunk(out, gate, up, 0, gate.shape[0], 0)


@fast
def geglu_serial(out, gate, up):
    """geglu on the calling thread."""
    _gated_chunk(out, gate, up, 0, gate.shape[0], 1)
