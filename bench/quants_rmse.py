"""Round-trip RMSE and speed of pyquant's quantizers against llama.cpp's (libggml-base via ctypes).

For every K-quant tensor of a real model (the ones whose rows are a multiple of 256), W = dequantized weights
plus noise of 1% of their std (off every grid); each is quantized to its own type and to the other formats
by pyquant and by ggml_quantize_chunk, and the table shows RMSE(dequantize(q) - W) for both, whether the
bytes are identical, and the time each took.

    python bench/quants_rmse.py [--model qwen] [--rows 256] [--types q2_k,q3_k,q4_k,q5_k,q6_k,q8_0]
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import numpy as np

import pyquant.quants as Q
from pyquant.gguf import GGUFFile
from pyquant.models import model_path


def load_ggml():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    return lib


def ggml_quantize(lib, x: np.ndarray, name: str) -> np.ndarray:
    out = np.zeros((x.shape[0], Q.row_bytes(name, x.shape[1])), dtype=np.uint8)
    lib.ggml_quantize_chunk(Q.type_id(name), x.ctypes.data, out.ctypes.data, 0, *x.shape, None)
    return out


def rmse(packed: np.ndarray, name: str, w: np.ndarray) -> float:
    return float(np.sqrt(np.mean((Q.dequantize(packed, name, w.shape) - w) ** 2)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--rows", type=int, default=256, help="rows per tensor (0: all)")
    ap.add_argument("--types", default="q2_k,q3_k,q4_k,q5_k,q6_k,q8_0")
    args = ap.parse_args()
    lib = load_ggml()
    rng = np.random.default_rng(0)
    f = GGUFFile(model_path(args.model))
    totals: dict[str, list[float]] = {}
    print(f"{'tensor':28s} {'type':5s} {'as':5s} {'rmse ours':>11s} {'rmse ggml':>11s} same  t ours  t ggml")
    for name, t in f.tensors.items():
        if not t.type.endswith("_k") or len(t.shape) != 2:
            continue
        rows = min(args.rows or t.shape[0], t.shape[0])
        w = Q.dequantize(t.data[: rows * Q.row_bytes(t.type, t.shape[1])], t.type, (rows, t.shape[1]))
        w = np.ascontiguousarray(
            w + rng.standard_normal(w.shape).astype(np.float32) * np.float32(0.01 * w.std())
        )
        for fmt in args.types.split(","):
            t0 = time.perf_counter()
            ours = Q.quantize(w, fmt)
            t1 = time.perf_counter()
            ref = ggml_quantize(lib, w, fmt)
            t2 = time.perf_counter()
            r_ours, r_ref = rmse(ours, fmt, w), rmse(ref, fmt, w)
            tot = totals.setdefault(fmt, [0, 0, 0, 0])
            tot[0] += 1
            tot[1] += int(r_ours <= r_ref)
            tot[2] += int(np.array_equal(ours, ref))
            tot[3] = max(tot[3], r_ours / r_ref - 1 if r_ref else 0.0)
            print(
                f"{name:28s} {t.type:5s} {fmt:5s} {r_ours:11.4e} {r_ref:11.4e} {np.array_equal(ours, ref)!s:5s}"
                f" {t1 - t0:6.2f}s {t2 - t1:6.3f}s"
            )
    print("\nformat  tensors  rmse<=ggml  bit-exact  worst relative excess")
    for fmt, (n, ok, same, worst) in totals.items():
        print(f"{fmt:6s} {n:8d} {ok:11d} {same:10d} {worst:+.2e}")


if __name__ == "__main__":
    main()
