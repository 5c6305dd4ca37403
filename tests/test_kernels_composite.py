"""The CPU kernels of the composite PTQ linears and the quantized KV cache (kernels_cpu/composite.py) against
their numpy references (pyquant/ptq/runtime.py) on random data and odd shapes: bit-exact where the
arithmetic is integer (w8a8, w4a4, KV codes), within float32 rounding where it is float (gq, LLM.int8()'s
float columns, attention); then tiny random models of every composite format, CPU backend vs numpy backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels_cpu.backend import CpuBackend, composite_linear
from pyquant.backend import NumpyBackend
from pyquant.ptq import runtime

SHAPES = [(1, 7, 64), (3, 16, 100), (13, 33, 288)]  # (T, N, K): odd rows, K off the 32-byte step


def rng(seed):
    return np.random.default_rng(seed)


def group_int(n, k, bits, group, sym=True, seed=0):
    lo, hi = runtime.code_range(bits, sym)
    if bits == 8:
        lo, hi = -128, 127
    r = rng(seed)
    codes = r.integers(lo, hi + 1, size=(n, k)).astype(np.int8)
    scale = (r.random((n, k // group)) * 0.02 + 0.001).astype(np.float16).astype(np.float32)
    zero = None if sym else (r.standard_normal((n, k // group)) * 0.05).astype(np.float16).astype(np.float32)
    return runtime.GroupInt(codes, scale, zero, bits)


def activations(t, k, seed):
    x = rng(seed).standard_normal((t, k)).astype(np.float32)
    x[:, :: max(1, k // 5)] *= 8  # a few large channels, as in real layers
    return x


@pytest.mark.parametrize("t,n,k", SHAPES)
def test_w8a8_bit_exact(t, n, k):
    ref = runtime.W8A8(group_int(n, k, 8, k, seed=k))
    x = activations(t, k, 1)
    np.testing.assert_array_equal(composite_linear(ref)(x), ref.linear(x))


@pytest.mark.parametrize("t,n,k", SHAPES)
def test_llm_int8_matches_the_reference(t, n, k):
    ref = runtime.Int8Mixed(group_int(n, k, 8, k, seed=k), 6.0)
    x = activations(t, k, 2) / 4
    cpu = composite_linear(ref)
    np.testing.assert_array_equal(cpu(x), ref.linear(x))  # no |x| > 6: the int8 path alone, exact
    x[t // 2, k // 3], x[0, k - 1] = 40.0, -25.0
    y, y_ref = cpu(x), ref.linear(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())


@pytest.mark.parametrize("t,n", [(1, 7), (5, 16), (12, 33)])
@pytest.mark.parametrize("n_outliers", [0, 32])
def test_w4a4_bit_exact(t, n, n_outliers):
    k, group = 192 + n_outliers, 64
    normal = group_int(n, 192, 4, group, seed=n)
    outlier = group_int(n, n_outliers, 8, n_outliers, seed=n + 1) if n_outliers else None
    ref = runtime.W4A4(rng(3).permutation(k), normal, outlier, 4, group, 0.9)
    x = activations(t, k, 4)
    np.testing.assert_array_equal(composite_linear(ref)(x), ref.linear(x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gq_matches_the_dense_product(bits, sym):
    t, n, k = 5, 19, 96
    ref = runtime.WeightOnly(group_int(n, k, bits, 32, sym, seed=bits))
    x = activations(t, k, 5)
    cpu = composite_linear(ref)
    from kernels_cpu import composite

    dense = np.empty((n, k), np.float32)
    composite.dequantize_gq(dense, cpu.packed, cpu.scale, cpu.mins, cpu.bits, cpu.lo)
    np.testing.assert_allclose(dense, ref.w.dequantize(), rtol=1e-6, atol=1e-7)
    y, y_ref = cpu(x), ref.linear(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())


@pytest.mark.parametrize("k_shift", [False, True])
def test_quantized_kv_cache_codes_and_attention(k_shift):
    n_ctx, g, h, d = 40, 2, 4, 64
    cpu, ref = CpuBackend(threads=2), NumpyBackend(cache_type="f32")
    r = rng(6)
    shift = scale = None
    if k_shift:  # Atom's static K shift/scale (per layer, (G, Dh))
        shift = [r.standard_normal((g, d)).astype(np.float32) * 3]
        scale = [r.uniform(0.2, 3, (g, d)).astype(np.float32)]
    caches = [runtime.KVQuant(4, 32, shift, scale).new_cache(1, n_ctx, g, d, d) for _ in range(2)]
    pos0 = 0
    for t in (17, 1, 5):  # a prefill, then decode steps
        q, k, v = (r.standard_normal((t, n, d)).astype(np.float32) for n in (h, g, g))
        k[:, 0, :3] *= 10  # an outlier key channel
        y = cpu.attention(q, k, v, caches[0], 0, pos0, 0.125)
        y_ref = ref.attention(q, k, v, caches[1], 0, pos0, 0.125)
        pos0 += t
        for a, b in ((caches[0].k[0], caches[1].k[0]), (caches[0].v[0], caches[1].v[0])):
            np.testing.assert_array_equal(a.codes[:pos0], b.codes[:pos0])
            np.testing.assert_array_equal(a.scale[:pos0], b.scale[:pos0])
            np.testing.assert_array_equal(a.min[:pos0], b.min[:pos0])
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)


# ---- tiny models, CPU backend vs numpy backend --------------------------------------------------------------

FILES = {
    "gq": ("rtn", {"bits": 3}),
    "w8a8": ("smoothquant", {"format": "w8a8"}),
    "int8_mixed": ("llm_int8", {"threshold": 2.0}),
    "w4a4": ("atom", {"outliers": 32, "atom_group": 32, "weight_algo": "rtn"}),
}


@pytest.fixture(scope="module")
def composite_files(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from converters.checkpoints import random_checkpoint
    from pyquant.ptq.calib import DEFAULT_TEXT, CalibConfig
    from pyquant.quantize import quantize

    out = tmp_path_factory.mktemp("composite")
    text = out / "calib.txt"
    text.write_text(DEFAULT_TEXT.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    calib = CalibConfig(text, n_samples=2, seq_len=64)
    tiny = random_checkpoint("qwen2")
    return {
        fmt: quantize(tiny, out / f"{fmt}.gguf", method, calib, progress=False, **opts)
        for fmt, (method, opts) in FILES.items()
    }


@pytest.mark.parametrize("fmt", FILES)
def test_tiny_model_cpu_backend_matches_numpy_backend(composite_files, fmt):
    import pyquant
    from pyquant.gguf import GGUFFile

    path = composite_files[fmt]
    assert GGUFFile(path).get("pyquant.linear.format") == fmt
    ref = pyquant.Model(path, backend="numpy")
    cpu = pyquant.Model(path, backend="cpu", threads=2)
    tokens = ref.tokenize(
        "The tower is 324 metres tall, about the same height as an 81-storey building. " * 2
    )
    # the bar: a plain Q8_0 file of this tiny model differs by 1.1-1.4% between the two backends (sums taken
    # in another order flip some int8 activation roundings, which random weights amplify)
    for n in (len(tokens), 3):  # the panel (prefill) and matvec (decode) paths of the plain tensors
        a, b = cpu.logits(tokens[:n]), ref.logits(tokens[:n])
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 3e-2, fmt
        assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() > 0.9
    if fmt == "w4a4":  # Atom's 4-bit KV cache on both
        assert isinstance(cpu.new_cache(8), runtime.QuantKVCache)
    cache = cpu.new_cache(len(tokens))
    cpu.transformer.forward(np.array(tokens[:-1]), 0, cache)
    step = cpu.transformer.forward(np.array(tokens[-1:]), len(tokens) - 1, cache)
    full = cpu.logits(tokens)[-1]
    assert np.linalg.norm(step - full) / np.linalg.norm(full) < 3e-2
