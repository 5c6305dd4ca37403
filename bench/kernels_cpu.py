"""CPU kernel variants, numbered, each checked against the numpy oracle before it is timed.

    python bench/kernels_cpu.py [--threads 1] [--only matvec|matmul|attention] [--reps 20]

Shapes are the real models' (Qwen2.5-0.5B: D 896, FF 4864, vocab 151936; Gemma 3 270M: D 640, FF 2048,
Dh 256) on random weights of the types those files use. Winners live in kernels_cpu/; the others stay here.

matvec (decode, one token):
  1  float activations, every 16 weights decoded into a float32 register and FMA'd (linear._matvec + dq16)
  2  int8 activations (act_quant.quantize_act) and integer dot products per block (formats.vdot)   <- used
matmul (prefill):
  1  matvec per token (weights re-read for every token)
  2  32-row panels decoded to float32 once, 12x32 register tiles of broadcast FMAs (linear._matmul) <- used
attention (prefill and decode over an f16 cache):
  1  one query row per work item, one key at a time (a dot product and a horizontal sum per key)
  2  key tiles decoded once per 16 queries x GQA group, 16 scores per vector FMA (attention._attend)  <- used
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

# this script shares its name with the package it measures: keep bench/ off the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numba
import numpy as np
from numba import literally, prange

import pyquant.quants as Q
from kernels_cpu import act_quant, attention, linear
from kernels_cpu.formats import FORMATS, dq16
from kernels_cpu.jit import FASTMATH
from kernels_cpu.linear import _row_dot
from kernels_cpu.simd import fexp, ffma, fhmax, fload, fmul, fsplat, fstore, fsub, fsum

MATVEC_SHAPES = [  # (type, N, K): the weights of one decode step, and each output projection
    ("q5_0", 4864, 896),
    ("q8_0", 4864, 896),
    ("q4_k", 896, 4864),
    ("q6_k", 896, 4864),
    ("q5_0", 896, 896),
    ("q8_0", 151936, 896),
    ("q5_0", 2048, 640),
    ("q4_k", 640, 1024),
    ("q8_0", 262144, 640),
]
MATMUL_SHAPES = [
    ("q5_0", 4864, 896, 512),
    ("q6_k", 896, 4864, 512),
    ("q8_0", 896, 896, 512),
    ("q5_0", 2048, 640, 512),
]


# --- variants that lost --------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def _matvec_float(y, w, x, fmt):
    literally(fmt)
    bv = 256 if fmt >= 8 else 32
    nb = x.shape[1] // bv
    for r in prange(w.shape[0]):
        for t in range(x.shape[0]):
            y[t, r] = _row_dot(w[r], x[t], nb, bv, fmt)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def _attend_rowwise(out, q, kc, vc, pos0, scale, window, fmt):
    literally(fmt)
    t_all, n_head, dk = q.shape
    group = n_head // kc.shape[1]
    dv = out.shape[2]
    for u in prange(t_all * n_head):
        t, h = u // n_head, u % n_head
        g, p = h // group, pos0 + t
        lo = max(0, p - window + 1) if window > 0 else 0
        qv, o = q[t, h], out[t, h]
        o[:] = 0
        tile = np.empty(16, np.float32)
        m, denom = -np.inf, np.float32(0)
        for s0 in range(lo, p + 1, 16):
            n = min(16, p + 1 - s0)
            for j in range(16):
                tile[j] = _row_dot(kc[s0 + j, g], qv, dk // 32, 32, fmt) * scale if j < n else -np.inf
            sv = fload(tile, 0)
            m_new = max(m, fhmax(sv))
            pv = fexp(fsub(sv, fsplat(m_new)))
            corr = np.float32(np.exp(m - m_new))
            denom = denom * corr + fsum(pv)
            m = m_new
            fstore(tile, 0, pv)
            for i in range(0, dv, 16):
                acc = fmul(fload(o, i), fsplat(corr))
                for j in range(n):
                    acc = ffma(dq16(fmt, vc[s0 + j, g], i // 32, (i // 16) % 2), fsplat(tile[j]), acc)
                fstore(o, i, acc)
        for i in range(0, dv, 16):
            fstore(o, i, fmul(fload(o, i), fsplat(np.float32(1) / denom)))


def specialized(kernel, *args):
    """Compile kernel for args (the last one a literal format code) and return that compiled entry point:
    calling a `literally` kernel through its dispatcher re-types it on every call (~40 ms)."""
    kernel(*args)
    for sig, cres in kernel.overloads.items():
        if getattr(sig[-1], "literal_value", None) == args[-1] and len(sig) == len(args):
            return lambda: cres.entry_point(*args)
    raise LookupError("no literal specialization")


# --- harness --------------------------------------------------------------------------------------------------
def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def check(y, y64, bound, what):
    ratio = float((np.abs(y - y64) / bound).max())
    assert ratio <= 1, f"{what}: error {ratio:.1f}x the bound"


def bench_matvec(reps):
    rng = np.random.default_rng(0)
    print("matvec (decode)        variant  us      GMAC/s  GB/s")
    for type, n, k in MATVEC_SHAPES:
        w = Q.quantize(rng.standard_normal((n, k)).astype(np.float32), type)
        w.flags.writeable = False
        x = rng.standard_normal((1, k)).astype(np.float32)
        act = (
            np.empty((1, k), np.int8),
            np.empty((1, k // 32), np.float32),
            np.empty((1, k // 16), np.float32),
        )
        act_quant.quantize_act(*act, x)
        x8 = (act[0].reshape(-1, 32) * act[1].reshape(-1, 1)).reshape(1, k)
        dense = Q.dequantize(w, type, (n, k)).astype(np.float64)
        y = np.empty((1, n), np.float32)
        variants = {
            1: (specialized(_matvec_float, y, w, x, FORMATS[type].code), x),
            2: (partial(linear.MATVEC[type], y, w, *act), x8),
        }
        for v, (fn, xin) in variants.items():
            fn()
            check(y, xin @ dense.T, 1e-5 * (np.abs(xin) @ np.abs(dense).T) + 1e-30, f"matvec {v} {type}")
            t = timed(fn, reps)
            print(
                f"{type} {n:>6}x{k:<5}      {v}  {t * 1e6:8.1f}  {n * k / t / 1e9:6.1f}  {w.nbytes / t / 1e9:5.1f}"
            )


def bench_matmul(reps):
    rng = np.random.default_rng(1)
    print("matmul (prefill)           variant  ms      GMAC/s")
    for type, n, k, t_len in MATMUL_SHAPES:
        w = Q.quantize(rng.standard_normal((n, k)).astype(np.float32), type)
        w.flags.writeable = False
        x = rng.standard_normal((t_len, k)).astype(np.float32)
        dense = Q.dequantize(w, type, (n, k)).astype(np.float64)
        y = np.empty((t_len, n), np.float32)
        variants = {
            1: specialized(_matvec_float, y, w, x, FORMATS[type].code),
            2: partial(linear.MATMUL[type], y, w, x),
        }
        for v, fn in variants.items():
            fn()
            check(y, x @ dense.T, 1e-5 * (np.abs(x) @ np.abs(dense).T) + 1e-30, f"matmul {v} {type}")
            tm = timed(fn, max(2, reps // 10))
            print(
                f"{type} {n:>5}x{k:<5} T={t_len}      {v}  {tm * 1e3:8.1f}  {n * k * t_len / tm / 1e9:6.1f}"
            )


def bench_attention(reps):
    rng = np.random.default_rng(2)
    print("attention (f16 cache)            variant  ms")
    for name, t_len, pos0, heads, kv, dh in (
        ("qwen prefill", 512, 0, 14, 2, 64),
        ("qwen decode@4k", 1, 4095, 14, 2, 64),
        ("gemma prefill", 512, 0, 4, 1, 256),
    ):
        n_ctx = pos0 + t_len
        keys = rng.standard_normal((n_ctx, kv, dh)).astype(np.float32)
        values = rng.standard_normal((n_ctx, kv, dh)).astype(np.float32)
        q = rng.standard_normal((t_len, heads, dh)).astype(np.float32)
        kc = keys.astype(np.float16).view(np.uint8).reshape(n_ctx, kv, -1)
        vc = values.astype(np.float16).view(np.uint8).reshape(n_ctx, kv, -1)
        out = np.empty((t_len, heads, dh), np.float32)
        scale = np.float32(1 / np.sqrt(dh))
        ref = np.empty_like(out)
        attention.ATTEND["f16"](ref, q, kc, vc, pos0, scale, 0)
        variants = {
            1: specialized(_attend_rowwise, out, q, kc, vc, pos0, scale, 0, 1),
            2: partial(attention.ATTEND["f16"], out, q, kc, vc, pos0, scale, 0),
        }
        for v, fn in variants.items():
            fn()
            assert np.abs(out - ref).max() < 1e-5, f"attention {v} {name}"
            tm = timed(fn, max(2, reps // 10))
            print(f"{name:<16} T={t_len:<4} pos0={pos0:<5}  {v}  {tm * 1e3:8.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["matvec", "matmul", "attention"])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    for name, fn in (("matvec", bench_matvec), ("matmul", bench_matmul), ("attention", bench_attention)):
        if args.only in (None, name):
            fn(args.reps)


if __name__ == "__main__":
    main()
