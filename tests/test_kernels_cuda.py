"""CUDA kernels and CudaBackend against the numpy oracle (pyquant.quants, NumpyBackend).

Runs for real on a GPU (bench/gpu_check.sh) and, everywhere else, in numba's CUDA simulator on tiny shapes:
without a GPU and without NUMBA_ENABLE_CUDASIM in the environment, this module turns the simulator on
before numba.cuda is first imported (the variable only affects numba.cuda, not the CPU kernels).
"""

from __future__ import annotations

import os
import sys

if "numba.cuda" not in sys.modules and "NUMBA_ENABLE_CUDASIM" not in os.environ:
    import shutil

    if not shutil.which("nvidia-smi"):
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np
import pytest

from pyquant.backend import NumpyBackend
from pyquant.gguf import GGUFFile, TensorInfo
from pyquant.quants import dequantize, quantize

pytestmark = pytest.mark.cuda

from kernels_cuda import gemm_int8 as g8
from kernels_cuda.backend import CudaBackend
from kernels_cuda.jit import SIM
from kernels_cuda.matvec import QW, q8_words
from kernels_cuda.quants import int8_codes

GEMV_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "f32", "f16"]
# The simulator runs every CUDA thread as a Python thread and every barrier through them all: there the shapes
# are the smallest that still reach each kernel variant and its edge cases (a partial last block of rows).
ROWS = 9 if SIM else 37


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def make_weight(type: str, n: int, k: int, seed: int = 0, name: str = "w") -> TensorInfo:
    x = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    data = quantize(x, type) if type not in ("f32",) else x.view(np.uint8)
    if type == "f16":
        data = x.astype(np.float16).view(np.uint8)
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return TensorInfo(name, type, (n, k), 0, data.size, data)


def dense(t: TensorInfo) -> np.ndarray:
    return dequantize(t.data, t.type, t.shape).astype(np.float64)


@pytest.fixture(scope="module")
def be():
    """Float activations throughout: products are the float32 arithmetic of the dequantized weights."""
    return CudaBackend(cache_type="f32", int8_decode=False)


@pytest.fixture(scope="module")
def be8():
    """The default: one-token products on activations rounded to int8 per 32 values (dp4a)."""
    return CudaBackend(cache_type="f32")


def q8_round(v: np.ndarray) -> np.ndarray:
    """v as the int8 decode GEMV sees it: per 32 values, codes rint(v * 127 / max|v|) (float32 arithmetic,
    half to even) times the scale max|v| / 127."""
    b = np.asarray(v, np.float32).reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return (np.rint(b * inv) * (amax / np.float32(127))).astype(np.float64).reshape(np.shape(v))


# ---- 1. dequantizing GEMV ------------------------------------------------------------------------------


@pytest.mark.parametrize("type", GEMV_TYPES)
def test_gemv_matches_dequantized_matmul(be, type):
    # K-quants: 72 units of 32 values, two warps a row in the decode GEMV, lanes with a second unit and without;
    # 32-value formats: 10 units, lanes with none
    k = 2304 if type in ("q4_k", "q5_k", "q6_k") else 320
    t = make_weight(type, ROWS, k, seed=1)
    w = be.weight(t)
    for n_tok in (1, 3):
        x = np.random.default_rng(n_tok).standard_normal((n_tok, k)).astype(np.float32)
        y = be.to_host(be.linear(be.from_host(x), w))
        ref = x.astype(np.float64) @ dense(t).T
        assert y.shape == (n_tok, ROWS)
        assert rel(y, ref) < 2e-6, (type, n_tok, rel(y, ref))


def test_gemv_fusions(be):
    """RMSNorm and SwiGLU/GeGLU fused into the product's input, bias, and a residual folded into it."""
    ref_be = NumpyBackend(cache_type="f32", act_quant=False)
    rng = np.random.default_rng(5)
    t = make_weight("q8_0", 24, 64, seed=2)
    w = be.weight(t)
    x, g, u = (rng.standard_normal((2, 64)).astype(np.float32) for _ in range(3))
    nw, bias = rng.standard_normal(64).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    r = rng.standard_normal((2, 24)).astype(np.float32)
    wd = dense(t)
    h = be.rms_norm(be.from_host(x), be.from_host(nw), 1e-6)
    y = be.linear(h, w, be.from_host(bias))
    z = be.add(be.from_host(r), y)
    assert rel(be.to_host(z), ref_be.rms_norm(x, nw, 1e-6) @ wd.T + bias + r) < 2e-6
    assert rel(be.to_host(y), ref_be.rms_norm(x, nw, 1e-6) @ wd.T + bias) < 2e-6
    assert rel(be.to_host(h), ref_be.rms_norm(x, nw, 1e-6)) < 1e-6  # the pending norm, materialized
    for op in ("swiglu", "geglu"):
        y = be.linear(getattr(be, op)(be.from_host(g), be.from_host(u)), w)
        c = np.float32(np.sqrt(2 / np.pi))
        act = g / (1 + np.exp(-g)) * u if op == "swiglu" else 0.5 * g * (1 + np.tanh(c * (g + 0.044715 * g**3))) * u
        assert rel(be.to_host(y), act @ wd.T) < 2e-6, op


def test_decode_gemv_joins(be):
    """One token: products of one input join one launch (q, k, v of two types, each with a bias), the gate
    joins the pair gate/up, a residual joins the product that feeds it."""
    ref_be = NumpyBackend(cache_type="f32", act_quant=False)
    rng = np.random.default_rng(6)
    k = 576
    ts = [make_weight(ty, n, k, seed=s) for ty, n, s in (("q5_0", 7, 1), ("q5_0", 3, 2), ("q8_0", 3, 3))]
    x, nw = rng.standard_normal((1, k)).astype(np.float32), rng.standard_normal(k).astype(np.float32)
    biases = [rng.standard_normal(t.shape[0]).astype(np.float32) for t in ts]
    h = be.rms_norm(be.from_host(x), be.from_host(nw), 1e-6)
    ys = [be.linear(h, be.weight(t), be.from_host(b)) for t, b in zip(ts, biases)]
    assert len(be.queue.items) == 1
    hn = ref_be.rms_norm(x, nw, 1e-6).astype(np.float64)
    for y, t, b in zip(ys, ts, biases):
        assert rel(be.to_host(y), hn @ dense(t).T + b) < 2e-6, t.type
    wg, wu, wd = (be.weight(make_weight(ty, n, kk, seed=s)) for ty, n, kk, s in
                  (("q8_0", 32, k, 4), ("q5_0", 32, k, 5), ("q4_0", 4, 32, 6)))
    r = rng.standard_normal((1, 4)).astype(np.float32)
    gd, ud, dd = (dense(w.info) for w in (wg, wu, wd))
    c = np.float32(np.sqrt(2 / np.pi))
    for op in ("swiglu", "geglu"):
        xd = be.from_host(x)
        g, u = be.linear(xd, wg), be.linear(xd, wu)
        a = getattr(be, op)(g, u)
        assert len(be.queue.items) == 1 and a.pending is None, op
        z = be.add(be.from_host(r), be.linear(a, wd))
        assert len(be.queue.items) == 2, op
        gr, ur = x.astype(np.float64) @ gd.T, x.astype(np.float64) @ ud.T
        act = gr / (1 + np.exp(-gr)) * ur if op == "swiglu" else 0.5 * gr * (1 + np.tanh(c * (gr + 0.044715 * gr**3))) * ur
        assert rel(be.to_host(z), act @ dd.T + r) < 2e-6, op
        assert rel(be.to_host(a), act) < 2e-6, op
        assert rel(be.to_host(g), gr) < 2e-6 and rel(be.to_host(u), ur) < 2e-6, op


@pytest.mark.parametrize("type", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q6_k"])
def test_decode_gemv_int8(be8, type):
    """One token on int8 activations: every format with an int8 unit against the dequantized weights times
    the input rounded as the kernel rounds it (q8_round); lanes with no unit, K-quant sub-blocks of both kinds."""
    k = 512 if type.endswith("_k") else 320
    t = make_weight(type, ROWS, k, seed=3)
    x = np.random.default_rng(7).standard_normal((1, k)).astype(np.float32)
    x[0, :32] = 0.0  # a unit of zeros: scale 0
    y = be8.to_host(be8.linear(be8.from_host(x), be8.weight(t)))
    assert rel(y, q8_round(x) @ dense(t).T) < 1e-5, type
    assert rel(y, x.astype(np.float64) @ dense(t).T) < 3e-2, type  # and near the float product


def test_decode_gemv_int8_fusions(be8):
    """The fused inputs on int8 activations: RMSNorm (its 1/rms applied after rounding), q/k/v of three types
    with biases in one launch, gate/up with SwiGLU in the epilogue, then down + residual over the gate's output,
    which the gate/up launch leaves quantized (input mode Q8: down stages nothing)."""
    ref_be = NumpyBackend(cache_type="f32", act_quant=False)
    rng = np.random.default_rng(8)
    k, ff = 256, 512
    x, nw = rng.standard_normal((1, k)).astype(np.float32), rng.standard_normal(k).astype(np.float32)
    ts = [make_weight(ty, n, k, seed=s) for ty, n, s in (("q5_0", 7, 1), ("q4_1", 3, 2), ("q8_0", 3, 3))]
    biases = [rng.standard_normal(t.shape[0]).astype(np.float32) for t in ts]
    h = be8.rms_norm(be8.from_host(x), be8.from_host(nw), 1e-6)
    ys = [be8.linear(h, be8.weight(t), be8.from_host(b)) for t, b in zip(ts, biases)]
    assert len(be8.queue.items) == 1
    rs = 1 / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-6)
    hq = q8_round(x * nw) * rs
    for y, t, b in zip(ys, ts, biases):
        assert rel(be8.to_host(y), hq @ dense(t).T + b) < 1e-5, t.type
    wg, wu, wd = (make_weight(ty, n, kk, seed=s) for ty, n, kk, s in (("q5_0", ff, k, 4), ("q8_0", ff, k, 5),
                                                                     ("q6_k", 5, ff, 6)))
    r = rng.standard_normal((1, 5)).astype(np.float32)
    xd = be8.from_host(x)
    a = be8.swiglu(be8.linear(xd, be8.weight(wg)), be8.linear(xd, be8.weight(wu)))
    z = be8.add(be8.from_host(r), be8.linear(a, be8.weight(wd)))
    assert len(be8.queue.items) == 2
    (_, _, _, up_args), (_, _, _, down_args) = be8.queue.items
    assert up_args[-4].size == ff // 32 * QW and down_args[12] is up_args[-4]  # down reads h as gate/up quantized it
    gr, ur = q8_round(x) @ dense(wg).T, q8_round(x) @ dense(wu).T
    act = gr / (1 + np.exp(-gr)) * ur
    assert rel(be8.to_host(a), act) < 1e-5
    got_a = be8.to_host(a)
    words, scales = q8_words(got_a)  # a unit's codes and sums (its pad word, QW - 1, is never written)
    got_words = up_args[-4].copy_to_host().reshape(-1, QW)[:, : QW - 1]
    assert np.array_equal(got_words, words.reshape(-1, QW)[:, : QW - 1])
    assert np.array_equal(up_args[-3].copy_to_host(), scales)
    assert rel(be8.to_host(z), q8_round(got_a) @ dense(wd).T + r) < 1e-5
    assert rel(be8.to_host(z), ref_be.swiglu(x @ dense(wg).T, x @ dense(wu).T) @ dense(wd).T + r) < 5e-2


@pytest.mark.parametrize("rows, k", [(40, 320), (3, 2304)])
def test_decode_gemv_int8_gated_pairs(be8, rows, k):
    """The gated pair takes two rows a warp a step: row counts that leave the last step's second rows empty,
    one with several warps a row (3 rows of 72 units: S = 4 in the simulator), each against the q8-rounded
    input times the dequantized weights."""
    from kernels_cuda import matvec as mv

    rng = np.random.default_rng(9)
    wg, wu = make_weight("q4_k" if k % 256 == 0 else "q5_0", rows, k, seed=10), make_weight("q8_0", rows, k, seed=11)
    x = rng.standard_normal((1, k)).astype(np.float32)
    xd = be8.from_host(x)
    g, u = be8.linear(xd, be8.weight(wg)), be8.linear(xd, be8.weight(wu))
    a = be8.swiglu(g, u)
    kern, grid, block, args = be8.queue.items[-1]
    assert kern._pq_rows_per_warp == 2 and args[-1] == (4 if rows == 3 else 1)  # S
    xq = q8_round(x)
    gr, ur = xq @ dense(wg).T, xq @ dense(wu).T
    assert rel(be8.to_host(g), gr) < 1e-5 and rel(be8.to_host(u), ur) < 1e-5
    assert rel(be8.to_host(a), gr / (1 + np.exp(-gr)) * ur) < 1e-5
    assert grid == min(-(-rows // (2 * (mv.WARPS1 // args[-1]))), mv.BLOCKS_PER_SM * be8.n_sm)


# ---- 2. int8 GEMMs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dp4a", "mma"])
def test_int8_gemm_exact(variant):
    from numba import cuda

    rng = np.random.default_rng(7)
    m, n, k = (40, 24, 96) if SIM else (300, 260, 1056)  # K/4 not a multiple of the 16-word K tile
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (n, k), dtype=np.int8)
    c = cuda.to_device(np.full((m, n), -7, np.int32))
    da, db = cuda.to_device(a.view(np.int32)), cuda.to_device(b.view(np.int32))
    kern, grid = (g8.gemm_s8_dp4a, ((-(-n // 64), -(-m // 64)), 256)) if variant == "dp4a" else (
        g8.gemm_s8_mma, g8.gemm_grid(m, n))
    kern[grid](c, da, db, m, n, k // 4)
    np.testing.assert_array_equal(c.copy_to_host(), a.astype(np.int64) @ b.astype(np.int64).T)


@pytest.mark.parametrize("type", ["q8_0", "q4_1", "f32"] if SIM else ["q8_0", "q4_1", "q6_k", "f32"])
def test_prefill_gemm(be, type):
    """Many tokens: int8 GEMM on activations quantized per 32 values (exact against that rounding), or the
    float GEMM for weights without integer codes."""
    k = 256 if type == "q6_k" else 96  # 24 words: the K tile (16 words) hangs over the end
    t = make_weight(type, 20, k, seed=3)
    codes = int8_codes(t.data, t.type, t.shape)
    if codes is not None:  # the codes reproduce the dequantized weight exactly
        c, s, m = codes
        wq = s.repeat(16, axis=1) * c.astype(np.float32) - (0 if m is None else m.repeat(32, axis=1))
        np.testing.assert_array_equal(wq, dequantize(t.data, t.type, t.shape))
    x = np.random.default_rng(4).standard_normal((11, k)).astype(np.float32)
    be2 = CudaBackend(cache_type="f32", gemv_tokens=4)
    y = be2.to_host(be2.linear(be2.from_host(x), be2.weight(t)))
    xb = x.reshape(-1, 32)
    d = np.abs(xb).max(axis=1, keepdims=True) / np.float32(127)
    q = np.where(d > 0, np.copysign(np.floor(np.abs(xb / d) + 0.5), xb), 0)
    xq = (q * d).reshape(x.shape) if codes is not None else x
    assert rel(y, xq.astype(np.float64) @ dense(t).T) < 2e-6


def test_gemm_q8_per16():
    """The per-16-scale product (q6_k's codes) on synthetic codes of one 64-wide row block, so the simulator
    runs it at K = 64 instead of q6_k's 256; q6_k itself goes through test_prefill_gemm on the GPU."""
    from numba import cuda

    rng = np.random.default_rng(8)
    t, n, k = 5, 6, 64
    codes = rng.integers(-32, 32, (n, k), dtype=np.int8)
    sw = rng.uniform(0.01, 0.1, (n, k // 16)).astype(np.float32)
    x = rng.standard_normal((t, k)).astype(np.float32)
    aq, sa, asum = (cuda.device_array((t, k // w), dt) for w, dt in ((4, np.int32), (32, np.float32), (32, np.float32)))
    g8.quantize_q8[(-(-t * k // 32 // 128),), 128](aq, sa, asum, cuda.to_device(x.reshape(-1)), t, k)
    y = cuda.device_array(t * n, np.float32)
    dummy = cuda.to_device(np.zeros(1, np.float32))
    sw_d = cuda.to_device(sw)
    g8.gemm_q8_kernel(True, False)[g8.gemm_grid(t, n)](y, aq, sa, asum, cuda.to_device(codes.view(np.int32)), sw_d,
                                                       sw_d, dummy, dummy, 0, t, n, k // 4)
    xb = x.reshape(-1, 32)
    d = np.abs(xb).max(axis=1, keepdims=True) / np.float32(127)
    xq = (np.where(d > 0, np.copysign(np.floor(np.abs(xb / d) + 0.5), xb), 0) * d).reshape(x.shape)
    wq = sw.repeat(16, axis=1).astype(np.float64) * codes
    assert rel(y.copy_to_host().reshape(t, n), xq.astype(np.float64) @ wq.T) < 2e-6


# ---- 3. ops and attention ------------------------------------------------------------------------------------


def test_ops_match_reference(be):
    ref = NumpyBackend(cache_type="f32", act_quant=False)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    assert rel(be.to_host(be.rms_norm(be.from_host(x), be.from_host(w), 1e-5)), ref.rms_norm(x, w, 1e-5)) < 1e-6
    pos = np.arange(5, 8)
    for neox in (True, False):
        for n_rot in (64, 32):
            got = be.to_host(be.rope(be.from_host(x), pos, n_rot, 10000.0, neox))
            assert rel(got, ref.rope(x, pos, n_rot, 10000.0, neox)) < 1e-6, (neox, n_rot)
    a, b = x[:, 0], x[:, 1]
    assert rel(be.to_host(be.add(be.from_host(a), be.from_host(b))), a + b) < 1e-7
    n = be.rms_norm(be.from_host(b), be.from_host(w), 1e-5)  # a post-norm added to the residual: one launch
    assert rel(be.to_host(be.add(be.from_host(a), n)), a + ref.rms_norm(b, w, 1e-5)) < 1e-6
    assert rel(be.to_host(be.scale(be.from_host(a), 3.5)), a * 3.5) < 1e-7
    assert rel(be.to_host(be.swiglu(be.from_host(a), be.from_host(b))), ref.swiglu(a, b)) < 1e-6
    ref.act_quant = False
    assert rel(be.to_host(be.geglu(be.from_host(a), be.from_host(b))), ref.geglu(a, b)) < 1e-6


def _kv_round(x, cache_type):
    """K/V values as the cache holds them (float32 scales)."""
    if cache_type in ("f32", "f16"):
        return x.astype(np.float16).astype(np.float32) if cache_type == "f16" else x
    b = x.reshape(-1, 32).astype(np.float32)
    if cache_type == "q8_0":
        d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
        inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
        v = b * inv
        return (np.copysign(np.floor(np.abs(v) + 0.5), v) * d).reshape(x.shape)
    i = np.abs(b).argmax(axis=1)
    d = (b[np.arange(len(b)), i] / np.float32(-8))[:, None]
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(np.trunc(b * inv + np.float32(8.5)), 15)
    return ((q - 8) * d).reshape(x.shape)


ATT_CASES = [(c, w) for c in ("f32", "f16", "q8_0", "q4_0") for w in (0, 2)]
ATT_SIM = [("f32", 0), ("f16", 2), ("q8_0", 2), ("q4_0", 0)]  # each cache type once, windows on and off


@pytest.mark.parametrize(("cache_type", "window"), ATT_SIM if SIM else ATT_CASES)
def test_attention_over_cache_types(cache_type, window):
    """Prefill 3 tokens, then decode 2, against textbook attention over the cache's rounded K/V."""
    rng = np.random.default_rng(11)
    be = CudaBackend(cache_type=cache_type)
    h, g, d, n = (2, 1, 64, 5) if SIM else (4, 2, 64, 5)
    q, k, v = (rng.standard_normal((n, hh, d)).astype(np.float32) for hh in (h, g, g))
    cache = be.new_cache(1, 8, g, d, d)
    outs = [be.to_host(be.attention(be.from_host(q[:3]), be.from_host(k[:3]), be.from_host(v[:3]), cache, 0, 0,
                                    0.125, window))]
    for p in (3, 4):
        outs.append(be.to_host(be.attention(be.from_host(q[p : p + 1]), be.from_host(k[p : p + 1]),
                                            be.from_host(v[p : p + 1]), cache, 0, p, 0.125, window)))
    got = np.concatenate(outs)
    ref = NumpyBackend(cache_type="f32", act_quant=False)
    rcache = ref.new_cache(1, 8, g, d, d)
    want = ref.attention(q, _kv_round(k, cache_type), _kv_round(v, cache_type), rcache, 0, 0, 0.125, window)
    assert rel(got, want) < (1e-6 if cache_type != "f16" else 1e-3), rel(got, want)


@pytest.mark.parametrize("cache_type", ["f16"] if SIM else ["f32", "f16"])
def test_decode_attention_long_context(cache_type):
    """Decode attention (attend1: keys split over blocks, chunks of keys, merged by the last block) against
    float64 softmax attention at contexts from 1 key to several chunks per split, with and without a window,
    heads of 64 (two key groups) and 256 (two value dims a thread)."""
    from numba import cuda

    from kernels_cuda import attention as att

    rng = np.random.default_rng(12)
    be = CudaBackend(cache_type=cache_type)
    n_ctx = 8 * att.CHUNK * att.SPLITS // 4 if SIM else 4096
    ctxs = (37, n_ctx) if SIM else (1, 37, 300, 2048, 4096)
    for h, g, d in ((2, 1, 64), (2, 1, 256)) if SIM else ((14, 2, 64), (4, 1, 256)):
        kc, ks = att.cache_arrays(att.CACHE_TYPES[cache_type], n_ctx * g * d)
        vc, vs = att.cache_arrays(att.CACHE_TYPES[cache_type], n_ctx * g * d)
        kv = rng.standard_normal((2, n_ctx * g * d)).astype(np.float16 if cache_type == "f16" else np.float32)
        kc.copy_to_device(kv[0])
        vc.copy_to_device(kv[1])
        kk, vv = (a.astype(np.float64).reshape(n_ctx, g, d) for a in kv)
        qh = rng.standard_normal(h * d).astype(np.float32)
        scratch = att.attend1_scratch(h, d)
        y = cuda.device_array(h * d, np.float32)
        for ctx in ctxs:
            for window in (0, 50) if ctx > 50 else (0,):
                be.queue.params_host[0] = ctx - 1
                be.queue.params_dev.copy_to_device(be.queue.params_host)
                # the copies here and the read below go on the default stream, which the queue's stream does not
                # wait for nor make wait (on the GPU the read overtook the longer kernels before this)
                cuda.synchronize()
                # the token's own K and V rows, which attend1 stores (the same values) before reading the cache
                kv_new = [cuda.to_device(a.reshape(n_ctx, g * d)[ctx - 1].astype(np.float32)) for a in kv]
                item = (att.attend1_kernel(att.CACHE_TYPES[cache_type], d, d), (h, att.SPLITS), att.THREADS,
                        (y, cuda.to_device(qh), kc, ks, vc, vs, be.queue.params_dev, np.float32(0.125), window, h, g,
                         *scratch, *kv_new, be._dummy2, be._dummy2, 0, False, False, be._dummy, be._dummy,
                         np.float32(0), False))
                be.queue.run_eager([item])
                cuda.synchronize()  # and the read below goes on the default stream too
                got = y.copy_to_host().reshape(h, d)
                lo = max(0, ctx - window) if window else 0
                want = np.empty((h, d))
                for hh in range(h):
                    sc = kk[lo:ctx, hh // (h // g)] @ (qh[hh * d : (hh + 1) * d].astype(np.float64) * 0.125)
                    p = np.exp(sc - sc.max())
                    want[hh] = p @ vv[lo:ctx, hh // (h // g)] / p.sum()
                assert rel(got, want) < 2e-6, (h, d, ctx, window, rel(got, want))


def _prefill_case(cache_type, h, g, dk, dv, pos0, ts, windows, cfg=None, seed=13):
    """The tiled prefill kernel (attention.attend) against float64 softmax attention over the cache's rounded
    K/V, T queries at positions pos0.. for each T in ts; every earlier row of the cache visible too."""
    from numba import cuda

    from kernels_cuda import attention as att
    from kernels_cuda import ops

    rng = np.random.default_rng(seed)
    be = CudaBackend(cache_type=cache_type)
    kind = att.CACHE_TYPES[cache_type]
    n = pos0 + max(ts)
    cache = be.new_cache(1, n + 3, g, dk, dv)
    (kc, ks), (vc, vs) = cache.k[0], cache.v[0]
    k = rng.standard_normal((n, g, dk)).astype(np.float32)
    v = rng.standard_normal((n, g, dv)).astype(np.float32)
    pd = be.queue.params_dev
    for p0, rows in ((0, slice(0, pos0)), (pos0, slice(pos0, n))):  # the earlier rows, then the batch's
        m = rows.stop - rows.start
        if not m:
            continue
        be.queue.params_host[0] = p0
        pd.copy_to_device(be.queue.params_host)
        cuda.synchronize()
        nthr = m * g * (dk + dv) // att.kv_per_thread(kind)
        be.queue.run_eager([(att.rope_store_kernel(kind), *ops.grid1(nthr, 128),
                             (be._dummy, be._dummy, kc, ks, cuda.to_device(k[rows].ravel()), vc, vs,
                              cuda.to_device(v[rows].ravel()), be._dummy2, be._dummy2, pd, m, h, g, dk, dv, 0, False,
                              False))])
    cuda.synchronize()
    kk = _kv_round(k, cache_type).astype(np.float64)
    vv = _kv_round(v, cache_type).astype(np.float64)
    scale = np.float32(0.125)
    for t in ts:
        q = rng.standard_normal((t, h, dk)).astype(np.float32)
        y = cuda.device_array(t * h * dv, np.float32)
        be.queue.params_host[0] = pos0
        pd.copy_to_device(be.queue.params_host)
        cuda.synchronize()
        for window in windows:
            grid, threads = att.attend_grid(h, g, t, dk, dv, cfg)
            be.queue.run_eager([(att.attend_kernel(kind, dk, dv, cfg), grid, threads,
                                 (y, cuda.to_device(q.ravel()), kc, ks, vc, vs, pd, scale, window, h, g, t))])
            cuda.synchronize()
            got = y.copy_to_host().reshape(t, h, dv)
            want = np.empty((t, h, dv))
            for i in range(t):
                qp = pos0 + i
                lo = max(0, qp - window + 1) if window > 0 else 0
                for hh in range(h):
                    sc = kk[lo : qp + 1, hh // (h // g)] @ (q[i, hh].astype(np.float64) * float(scale))
                    p = np.exp(sc - sc.max())
                    want[i, hh] = p @ vv[lo : qp + 1, hh // (h // g)] / p.sum()
            err = rel(got, want)
            assert err < 2e-6, (cache_type, h, g, dk, dv, pos0, t, window, cfg, err)


PREFILL_CASES = [  # cache type, heads, kv heads, dk, dv, first position, token counts, windows, tile override
    ("f32", 4, 2, 64, 64, 70, (1, 5, 37), (0, 7), None),  # past one 64-key tile: skipped and partial tiles
    ("f16", 4, 2, 64, 64, 3, (5, 37), (0, 7), None),
    ("q8_0", 4, 2, 64, 64, 3, (37,), (0, 7), None),
    ("q4_0", 4, 2, 64, 64, 3, (37,), (0, 7), None),
    ("f32", 4, 2, 64, 64, 40, (5, 37), (0, 7), dict(warps=2, rows=4, bk=32, chunks=(32, 32))),  # chunked
    ("f16", 4, 1, 256, 256, 3, (1, 5, 19), (0, 7), None),  # gemma-like: chunked staging
    ("q4_0", 4, 1, 256, 256, 40, (19,), (0, 7), None),
    ("q8_0", 4, 2, 128, 64, 3, (5,), (0,), None),  # Dk != Dv
]
PREFILL_SIM = [  # the same ground in fewer launches (the simulator runs each thread in Python)
    ("f32", 4, 2, 64, 64, 70, (1, 5), (0, 7), None),
    ("f16", 4, 2, 64, 64, 3, (5,), (7,), None),
    ("q8_0", 4, 2, 64, 64, 3, (37,), (7,), None),
    ("q4_0", 4, 2, 64, 64, 3, (37,), (0,), None),
    ("f32", 4, 2, 64, 64, 40, (37,), (7,), dict(warps=2, rows=4, bk=32, chunks=(32, 32))),
    ("f16", 4, 1, 256, 256, 3, (1, 19), (7,), None),
    ("q4_0", 4, 1, 256, 256, 40, (5,), (0,), None),
    ("q8_0", 4, 2, 128, 64, 3, (5,), (0,), None),
]


@pytest.mark.parametrize("case", PREFILL_SIM if SIM else PREFILL_CASES, ids=lambda c: f"{c[0]}-{c[3]}x{c[4]}-g{c[2]}-p{c[5]}"
                         + ("-tiles" if c[8] else ""))
def test_prefill_attention_tiled(case):
    """attention.attend (query tiles of one KV head's rows, key tiles in shared memory, online softmax) against
    float64: token counts that are not multiples of the tile, earlier cache rows, GQA, a window, every cache
    type, heads of 64 (K and V staged together) and 256 (staged in turn), a forced chunked tiling, Dk != Dv."""
    from kernels_cuda import attention as att

    cache_type, h, g, dk, dv, pos0, ts, windows, over = case
    _prefill_case(cache_type, h, g, dk, dv, pos0, ts, windows, att.attend_config(dk, dv, **over) if over else None)


# ---- 4. the backend in the transformer ------------------------------------------------------------------------


def tiny_gguf(path, arch: str, seed: int = 0, n_head: int = 2):
    """A random-weight model of `arch` small enough for the simulator, with a mix of weight types (one head:
    half the simulator's decode attention time)."""
    from pyquant.gguf.writer import TensorSpec, write_gguf

    rng = np.random.default_rng(seed)
    d, h, g, dh, ff, n_vocab, n_layer = (32, n_head, 1, 32, 32, 48, 1) if SIM else (64, n_head, 1, 32, 512, 48, 2)
    meta = {
        "general.architecture": arch,
        f"{arch}.context_length": 64,
        f"{arch}.embedding_length": d,
        f"{arch}.block_count": n_layer,
        f"{arch}.feed_forward_length": ff,
        f"{arch}.attention.head_count": h,
        f"{arch}.attention.head_count_kv": g,
        f"{arch}.attention.key_length": dh,
        f"{arch}.attention.value_length": dh,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(n_vocab)],
    }
    if arch == "gemma3":
        meta[f"{arch}.attention.sliding_window"] = 3
    specs = []

    def add(name, shape, type, scale=0.3):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        specs.append(TensorSpec(name, type, shape, (lambda x=x, t=type: x if t == "f32" else quantize(x, t))))

    add("token_embd.weight", (n_vocab, d), "q8_0", 1.0)
    add("output_norm.weight", (d,), "f32", 1.0)
    for i in range(n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (d,), "f32", 1.0)
        add(p + "attn_q.weight", (h * dh, d), "q5_0")
        add(p + "attn_k.weight", (g * dh, d), "q4_0")
        add(p + "attn_v.weight", (g * dh, d), "q8_0")
        add(p + "attn_output.weight", (d, h * dh), "q4_1")
        add(p + "ffn_norm.weight", (d,), "f32", 1.0)
        add(p + "ffn_gate.weight", (ff, d), "q5_0")
        add(p + "ffn_up.weight", (ff, d), "q8_0")
        add(p + "ffn_down.weight", (d, ff), ("q6_k" if i % 2 else "q4_k") if ff % 256 == 0 else "q4_0", 0.1)
        if arch == "qwen2":
            for name, n in (("attn_q.bias", h * dh), ("attn_k.bias", g * dh), ("attn_v.bias", g * dh)):
                add(p + name, (n,), "f32")
        else:
            for name, n in (("attn_q_norm.weight", dh), ("attn_k_norm.weight", dh), ("post_attention_norm.weight", d),
                            ("post_ffw_norm.weight", d)):
                add(p + name, (n,), "f32", 1.0)
    return write_gguf(path, meta, specs)


@pytest.mark.parametrize("arch", ["gemma3"] if SIM else ["qwen2", "gemma3"])
def test_backend_logits_match_numpy(tmp_path, arch):
    """Prefill (GEMV path and int8 GEMM path) then decode steps: logits against the numpy backend's exact
    arithmetic (the int8 path rounds activations to 8 bits: a looser bound). The simulator runs gemma3 alone:
    it reaches every op qwen2 does but the bias (test_gemv_fusions), plus scale, q/k norms, GeGLU, a window.
    Decode steps after the first replay the recorded one (the model's Python is not run for them)."""
    from pyquant.model import Transformer

    f = GGUFFile(tiny_gguf(tmp_path / "tiny.gguf", arch))
    tokens = np.array([3, 17, 5, 40, 8, 22])
    n_pre, steps = (2, (2, 3)) if SIM else (4, (4, 5))  # the simulator runs a barrier in Python threads: keep it short
    ref = Transformer(f, NumpyBackend(cache_type="f32", act_quant=False))
    rc = ref.new_cache(16)
    want = [ref.forward(tokens[:n_pre], 0, rc, all_logits=True)]
    want += [ref.forward(tokens[i : i + 1], i, rc) for i in steps]
    # float decode: the numpy arithmetic; the default rounds decode activations to int8 (dp4a), and
    # gemv_tokens=1 sends the prefill through the int8 GEMM (q, k and v sharing one quantized input): looser
    # bounds. The simulator runs that one alone (a minute a backend; the GEMV prefill and the float products
    # are checked op by op in the GEMV tests).
    backends = [(CudaBackend(cache_type="f32", gemv_tokens=1), 6e-2)]
    if not SIM:
        backends += [(CudaBackend(cache_type="f32"), 6e-2), (CudaBackend(cache_type="f32", int8_decode=False), 1e-5)]
    for be, tol in backends:
        m = Transformer(f, be)
        cache = m.new_cache(16)
        got = [m.forward(tokens[:n_pre], 0, cache, all_logits=True)]
        got += [m.forward(tokens[i : i + 1], i, cache) for i in steps]
        for a, b in zip(got, want):
            assert a.shape == b.shape
            assert rel(a, b) < tol, (be.gemv_tokens, rel(a, b))
        assert np.argmax(got[-1]) == np.argmax(want[-1])
        assert be.n_replays == len(steps) - 1
        # get_rows, 5 a layer (q/k/v, attention with the q/k norms, RoPE and the K/V store, output + residual,
        # gate/up + gate, down + residual), output; gemma3 adds scale, and 2 post-norms with their residual adds
        assert len(be.queue.last_sig) == 2 + (5 if arch == "qwen2" else 7) * m.hp.n_layer + (arch == "gemma3")
        with pytest.raises(Exception, match="out of range"):  # refused by the replayed step too
            m.forward(np.array([m.hp.n_vocab]), steps[-1] + 1, cache)


def test_pinned_host_buffers_start_zeroed():
    """The backend's page-locked host buffers (the zero the token ring's count starts from, the step's
    parameters, the host copies) hold zeros when made, even where the memory was another buffer's: on an H100 a
    greedy run on a second model in one process read a logit of the first as the ring's count."""
    from numba import cuda

    from kernels_cuda.launch import pinned_zeros

    for _ in range(3):  # memory the pinned allocator may hand out again
        junk = np.zeros(4096, np.float32) if SIM else cuda.pinned_array(4096, np.float32)
        junk[:] = 0.07
        del junk
        z = pinned_zeros(4096, np.int32)
        assert z.dtype == np.int32 and z.shape == (4096,) and not z.any()
    be = CudaBackend()
    assert be._ring_zero[0] == 0 and not be._step_params.any() and not be.queue.params_host.any()


@pytest.mark.parametrize("n_tok", [1, 5])
def test_decode_step_queues_the_same_launches(tmp_path, n_tok):
    """Two decode steps at different positions (or two 5-token prefills through the int8 GEMM) queue the same
    kernels over the same buffer and scalar objects (so the pass's CUDA graph is replayed after one cheap
    identity comparison); host only, nothing launched."""
    from pyquant.model import Transformer

    be = CudaBackend(cache_type="f32", gemv_tokens=2)
    m = Transformer(GGUFFile(tiny_gguf(tmp_path / "tiny.gguf", "qwen2")), be)
    cache = m.new_cache(16)
    steps, q = [], be.queue

    def flush():  # LaunchQueue.flush without the launches
        if q.items:
            steps.append(q.items)
        q.items, q.n_params, q.pos0 = [], 1, None

    q.flush = flush
    for pos in (3, 4):
        if n_tok == 1:
            m.forward(np.array([pos]), pos, cache)
        else:
            m.forward(np.arange(n_tok) + pos, 0, cache)
    a, b = steps
    assert len(a) == len(b) > 0
    for (ka, ga, ba, xa), (kb, gb, bb, xb) in zip(a, b):
        assert ka is kb and ga == gb and ba == bb and len(xa) == len(xb)
        assert all(u is v or type(u) is int and u == v for u, v in zip(xa, xb)), ka
    with pytest.raises(Exception, match="out of range"):
        be.get_rows(m.embd, np.array([m.hp.n_vocab]))

