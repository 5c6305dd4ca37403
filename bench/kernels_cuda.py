"""CUDA decode kernel variants on the real models' shapes, each checked before it is timed (one device call).

    python bench/kernels_cuda.py [--only gemv|attend] [--reps 20] [--json OUT]
    NUMBA_ENABLE_CUDASIM=1 python bench/kernels_cuda.py --check     (tiny shapes, correctness only)

Times come from a CUDA graph of `reps` copies of one launch, replayed 5 times (no host launch gaps), as
bench/e2e_gpu.py's kernel profile does. Weights are random bits with sane float scales: a GEMV's speed depends
on shapes and types, not values.

gemv (matvec.gemv1, one token), on float and on int8 activations (dp4a): the launch shape swept, every result
  checked against the default launch's: blocks an SM (the grid; the kernel loops over rows) x S (warps a row);
  GB/s of weight bytes. Launches take turns over copies of the weights that together pass the 50 MB L2, so
  each reads HBM as a decode step does. default: matvec.gemv1_launch
attend (one query token over an f16 cache, at several context lengths), both checked against float64:
  attention.attend    the prefill kernel: a block a (head, token), a thread a key over Dk
  attention.attend1   decode (used for one token): keys split over blocks, merged by the last to finish
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# this script shares its name with the package it measures: keep bench/ off the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np
from numba import cuda

from kernels_cuda import attention as att
from kernels_cuda import matvec as mv
from kernels_cuda.backend import CudaBackend, _Decode
from kernels_cuda.jit import SIM
from kernels_cuda.quants import GPU_FORMATS
from pyquant.quants import get_format

GEMV_CASES = [  # name, type, rows, K, gated (two weights of this shape and the SwiGLU epilogue)
    ("qwen ffn gate/up + SwiGLU", "q5_0", 4864, 896, True),
    ("qwen ffn_down q6_k", "q6_k", 896, 4864, False),
    ("qwen ffn_down q4_k", "q4_k", 896, 4864, False),
    ("qwen attn_q", "q5_0", 896, 896, False),
    ("qwen output", "q8_0", 151936, 896, False),
    ("gemma ffn gate/up + GeGLU", "q5_0", 2048, 640, True),
    ("gemma output", "q8_0", 262144, 640, False),
]
GEMV_SIM = [("tiny gated", "q5_0", 40, 256, True), ("tiny q6_k", "q6_k", 9, 512, False)]
ATTEND_CASES = [("qwen", 14, 2, 64), ("gemma", 4, 1, 256)]  # name, heads, kv heads, head size


class RandomWeight:
    """A CudaWeight of random repacked blocks: q random bits, d in [1e-3, 1e-2)."""

    def __init__(self, type: str, n: int, k: int, rng):
        fmt = GPU_FORMATS[type]
        nb = k // fmt.block_values
        self.type, self.shape, self.name = type, (n, k), f"random {type}"
        self.q = cuda.to_device(rng.integers(0, 2**32, (n, nb * fmt.qb // 4), dtype=np.uint32))
        self.d = cuda.to_device(rng.uniform(1e-3, 1e-2, (n, nb * fmt.db)).astype(np.float32))
        self.nbytes = n * nb * get_format(type).type_size


def time_items(be, items, reps: int) -> float:
    """Microseconds per launch of `items` (one launch, or a step), from a graph of reps copies."""
    q = be.queue
    if SIM or not q.graphs:
        return float("nan")
    g = q.capture(items * reps)
    g.launch(q.core_stream)
    q.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        g.launch(q.core_stream)
    q.synchronize()
    return (time.perf_counter() - t0) / (5 * reps) * 1e6


# ---- decode GEMV: launch shapes ----------------------------------------------------------------------------


def bench_gemv(be, cases, reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for name, type, n, k, gated in cases:
        nbytes = RandomWeight(type, 1, k, rng).nbytes * n * (2 if gated else 1)
        # copies of the weights past the 50 MB L2, taken in turn: each launch reads from HBM, as in a decode step
        copies = 1 if SIM else max(1, min(reps, -(-160_000_000 // nbytes)))
        sets = [[RandomWeight(type, n, k, rng) for _ in range(2 if gated else 1)] for _ in range(copies)]
        x = be.from_host(rng.standard_normal((1, k)).astype(np.float32))
        ys = [be._out((1, n)) for _ in range(3 if gated else 1)]
        for int8 in (False, True):
            be.int8_decode = int8
            items = []
            for ws in sets:
                d = _Decode(x, (mv.PLAIN, x, be._dummy, be._dummy, np.float32(0)), ws[0], ys[0], None, [])
                if gated:
                    d.ws, d.ys, d.bs, d.glu = ws, ys, [None, None], mv.SWIGLU
                items.append(d.item(be))
            kern, grid0, block0, args0 = items[0]
            s0 = args0[-1]
            ref = None
            rows = []
            for bps in (1, 2) if SIM else (2, 4, 8, 16):
                for sp in sorted({1, 2, 4, 8, s0, -(-k // (32 * mv.UNIT))} - {0}):
                    grid, block, _ = mv.gemv1_launch(n, k, be.n_sm, bps, sp)
                    launch = [(kern, grid, block, a[:-1] + (sp,)) for _, _, _, a in items]
                    be.queue.run_eager(launch[:1])
                    cuda.synchronize()  # the reads go on the default stream, which does not wait for the queue's
                    y = ys[-1].buf.copy_to_host()
                    if ref is None:
                        be.queue.run_eager(items[:1])
                        cuda.synchronize()
                        ref = ys[-1].buf.copy_to_host()
                    err = float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))
                    us = time_items(be, launch, max(1, reps // len(launch)))
                    gbs = nbytes / us / 1e3
                    rows.append({"blocks_per_sm": bps, "split": sp, "grid": grid, "block": block, "us": round(us, 2),
                                 "GB/s": round(gbs, 1), "max_rel_err": err,
                                 "default": grid == grid0 and sp == s0 and block == block0})
                    if err > 1e-5:  # reported, not timed as a winner
                        print(f"{name}: blocks/SM {bps}, S {sp}: max rel err {err:.2e} against the default launch",
                              flush=True)
            ok = [r for r in rows if r["max_rel_err"] <= 1e-5]
            best = min(ok, key=lambda r: r["us"] if not math.isnan(r["us"]) else 0)
            dflt = next(r for r in rows if r["default"]) if any(r["default"] for r in rows) else rows[0]
            regs = _regs(kern)
            act = "int8" if int8 and type in mv.INT_UNITS else "f32"
            print(f"{name:28} {act:4} default {dflt['us']:7.1f} us ({dflt['GB/s']:6.0f} GB/s, grid {grid0}, S {s0}); "
                  f"best {best['us']:7.1f} us ({best['GB/s']:6.0f} GB/s) at {best['blocks_per_sm']} blocks/SM, S "
                  f"{best['split']}; registers {regs}", flush=True)
            out.append({"case": name, "type": type, "rows": n, "K": k, "gated": gated, "activations": act,
                        "registers": regs, "weight_copies": copies, "runs": rows})
        be.int8_decode = True
    return out


def _regs(kern):
    try:
        r = kern.get_regs_per_thread()
        return max(r.values()) if isinstance(r, dict) else r
    except Exception as e:  # noqa: BLE001 (the simulator, an older numba-cuda)
        return str(e)[:40]


# ---- decode attention: the prefill kernel on one token vs attend1 ---------------------------------------


def bench_attend(be, cases, ctxs, reps: int) -> list[dict]:
    rng = np.random.default_rng(1)
    kind = att.CACHE_TYPES["f16"]
    out = []
    for name, h, g, dh in cases:
        n_ctx = max(ctxs) + 1
        cache = be.new_cache(1, n_ctx, g, dh, dh)
        (kc, ks), (vc, vs) = cache.k[0], cache.v[0]
        kv = rng.standard_normal((2, n_ctx * g * dh)).astype(np.float16)
        kc.copy_to_device(kv[0])
        vc.copy_to_device(kv[1])
        qh = rng.standard_normal(h * dh).astype(np.float32)
        q = cuda.to_device(qh)
        scale = np.float32(1 / math.sqrt(dh))
        scratch = att.attend1_scratch(h, dh)
        y1, y2 = cuda.device_array(h * dh, np.float32), cuda.device_array(h * dh, np.float32)
        pd = be.queue.params_dev
        for ctx in ctxs:
            be.queue.params_host[0] = ctx - 1  # the query at position ctx - 1 sees ctx keys
            pd.copy_to_device(be.queue.params_host)
            cuda.synchronize()  # the copies above went out on the default stream, the kernels go on the queue's
            common = (q, kc, ks, vc, vs, pd, scale, 0, h, g, dh, dh)
            i1 = (att.attend_kernel(kind), (h, 1), att.THREADS, (y1, *common))
            i2 = (att.attend1_kernel(kind, dh, dh), (h, att.SPLITS), att.THREADS, (y2, *common[:-2], *scratch))
            be.queue.run_eager([i1, i2])
            cuda.synchronize()  # the reads below go on the default stream, which does not wait for the queue's
            got1, got2 = y1.copy_to_host(), y2.copy_to_host()
            kk = kv[0].astype(np.float64).reshape(n_ctx, g, dh)[:ctx]
            vv = kv[1].astype(np.float64).reshape(n_ctx, g, dh)[:ctx]
            want = np.empty((h, dh))
            for hh in range(h):
                sc = kk[:, hh // (h // g)] @ (qh[hh * dh : (hh + 1) * dh].astype(np.float64) * float(scale))
                p = np.exp(sc - sc.max())
                want[hh] = p @ vv[:, hh // (h // g)] / p.sum()
            errs = [float(np.abs(y.reshape(h, dh) - want).max() / np.abs(want).max()) for y in (got1, got2)]
            if max(errs) > 1e-4:
                raise AssertionError(f"attend {name} ctx {ctx}: max rel err {errs}")
            t1, t2 = time_items(be, [i1], reps), time_items(be, [i2], reps)
            print(f"attend {name:6} ctx {ctx:5}: attend {t1:7.1f} us, attend1 {t2:7.1f} us; errors "
                  f"{errs[0]:.1e} {errs[1]:.1e}", flush=True)
            out.append({"model": name, "ctx": ctx, "attend_us": t1, "attend1_us": t2, "errors": errs})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["gemv", "attend"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check", action="store_true", help="tiny shapes, correctness only (the simulator)")
    ap.add_argument("--json", type=str)
    args = ap.parse_args()
    be = CudaBackend(cache_type="f16")
    small = args.check or SIM
    name = "simulator" if SIM else cuda.get_current_device().name
    res = {"device": name.decode() if isinstance(name, bytes) else name}
    if args.only in (None, "gemv"):
        res["gemv"] = bench_gemv(be, GEMV_SIM if small else GEMV_CASES, args.reps)
    if args.only in (None, "attend"):
        cases = [("tiny", 2, 1, 64), ("tiny256", 1, 1, 256)] if small else ATTEND_CASES
        res["attend"] = bench_attend(be, cases, [1, 5, 300] if small else [16, 64, 128, 512, 2048, 4096], args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
