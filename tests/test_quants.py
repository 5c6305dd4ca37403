"""pyquant.quants against its two oracles: the gguf package (gguf-py) and llama.cpp's own ggml library.

- dequantize: bit-exact with gguf.quants.dequantize on random blocks of every type and on every tensor of
  the two real models (read with pyquant.gguf);
- quantize: bit-exact with gguf.quants.quantize where gguf has a quantizer (f16, bf16, q4_0..q8_0), and with
  ggml itself (ggml_quantize_chunk / quantize_row_q8_K_ref from llama-cpp-python's libggml-base, through
  ctypes) for every type, K-quants included, on perturbed real weights and on awkward inputs;
- the API: shapes, registry, and one-line errors.
A mismatch reports how many blocks differ and shows the worst one.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import itertools
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

import pyquant.quants as Q
from pyquant.errors import PyquantError

ALL = list(Q.FORMATS)
GGUF_QUANTIZERS = ["f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
F16_FIELDS = ("d", "dmin", "m", "f16")  # 2-byte fields with these names hold float16


# ---------------------------------------------------------------------------------------------- helpers


def assert_same_bytes(ours: np.ndarray, ref: np.ndarray, type_size: int, what: str):
    a, b = ours.reshape(-1, type_size), np.asarray(ref).view(np.uint8).reshape(-1, type_size)
    diff = (a != b).sum(axis=1)
    if diff.any():
        i = int(diff.argmax())
        raise AssertionError(
            f"{what}: {np.count_nonzero(diff)} of {len(a)} blocks differ; worst block {i} ({diff[i]} bytes):"
            f"\n  ours {a[i].tolist()}\n  ref  {b[i].tolist()}"
        )


def assert_same_floats(ours: np.ndarray, ref: np.ndarray, block_size: int, what: str):
    """Bit-exact float32 comparison, block by block (NaN payloads included)."""
    a = np.ascontiguousarray(ours, dtype=np.float32).reshape(-1, block_size)
    b = np.ascontiguousarray(ref, dtype=np.float32).reshape(-1, block_size)
    bad = (a.view(np.uint32) != b.view(np.uint32)).any(axis=1)
    if bad.any():
        with np.errstate(invalid="ignore", over="ignore"):
            err = np.nan_to_num(np.abs(a - b), nan=np.inf).max(axis=1)
        i = int(np.where(bad, err, -1).argmax())
        raise AssertionError(
            f"{what}: {np.count_nonzero(bad)} of {len(a)} blocks differ; worst block {i} (max |diff| {err[i]}):"
            f"\n  ours {a[i].tolist()}\n  ref  {b[i].tolist()}"
        )


def random_blocks(fmt: Q.BlockFormat, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes, with every float16 scale field set to a finite value of varied magnitude."""
    b = rng.integers(0, 256, size=(n, fmt.type_size), dtype=np.uint8)
    for name, (offset, size) in fmt.fields().items():
        if size == 2 and name in F16_FIELDS:
            v = rng.standard_normal(n) * np.exp2(rng.integers(-20, 10, n))
            b[:, offset : offset + 2] = v.astype(np.float16).reshape(-1, 1).view(np.uint8)
    if fmt.name == "q8_k":  # d is a float32
        b[:, 0:4] = (rng.standard_normal(n) * 1e-2).astype(np.float32).reshape(-1, 1).view(np.uint8)
    return b


def awkward_inputs(rng: np.random.Generator, rows: int, n: int) -> dict[str, np.ndarray]:
    """Inputs that stress the rounding and search paths; none holds -0.0 in an all-zero block (see below)."""
    shape = (rows, n)
    x = {
        "normal": rng.standard_normal(shape),
        "scaled rows": rng.standard_normal(shape) * np.exp(rng.uniform(-12, 8, (rows, 1))),
        "heavy tails": rng.standard_cauchy(shape),
        "outliers": rng.standard_normal(shape) * np.where(rng.random(shape) < 0.01, 100.0, 1.0),
        "sparse": rng.standard_normal(shape) * (rng.random(shape) < 0.05),
        "one-sided": np.abs(rng.standard_normal(shape)),
        "small ints": rng.integers(-8, 9, shape) / 2.0,  # exact halves: rounding ties
        "constant rows": np.repeat(rng.standard_normal((rows, 1)), n, axis=1),
        "subnormal": rng.standard_normal(shape) * 1e-39,
    }
    x = {k: np.asarray(v, dtype=np.float32) for k, v in x.items()}
    x["sparse"] += np.float32(0.0)  # -0.0 -> +0.0: gguf-py and ggml disagree on its sign
    x["zeros"] = np.zeros(shape, dtype=np.float32)
    return x


# ------------------------------------------------------------------------------- llama.cpp's ggml library


def _load_ggml():
    try:
        import llama_cpp
    except ImportError:
        return None
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.quantize_row_q8_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


GGML = _load_ggml()
needs_ggml = pytest.mark.skipif(GGML is None, reason="llama-cpp-python (libggml-base) not installed")


def _load_ggml_cpu():
    """libggml-cpu, whose run-time activation quantizers are SIMD code; None unless x86 with AVX."""
    cpuinfo = Path("/proc/cpuinfo")
    if GGML is None or not cpuinfo.exists() or " avx " not in cpuinfo.read_text():
        return None
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    lib.ggml_cpu_init()
    for fn in (lib.quantize_row_q8_0, lib.quantize_row_q8_K):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def ggml_quantize(x: np.ndarray, name: str) -> np.ndarray:
    """llama.cpp's own bytes for float32 rows x (rows, n)."""
    fmt = Q.get_format(name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], Q.row_bytes(name, x.shape[1])), dtype=np.uint8)
    if name == "q8_k":  # an activation type: not in ggml_quantize_chunk
        GGML.quantize_row_q8_K_ref(x.ctypes.data, out.ctypes.data, x.size)
    else:
        GGML.ggml_quantize_chunk(int(fmt.ggml_type), x.ctypes.data, out.ctypes.data, 0, *x.shape, None)
    return out


# ------------------------------------------------------------------------------------- real model tensors


@functools.cache
def real_model(model: str):
    from pyquant.gguf import GGUFFile
    from pyquant.models import model_path

    return GGUFFile(model_path(model))


@functools.cache
def real_weights(rows: int = 48) -> np.ndarray:
    """`rows` rows of qwen's first Q4_K matrix (its width is a multiple of 256), dequantized, plus noise
    of 1% of its std so that the values are off every quantization grid."""
    t = next(t for t in real_model("qwen").tensors.values() if t.type == "q4_k")
    shape = (rows, t.shape[-1])
    w = Q.dequantize(t.data[: rows * Q.row_bytes("q4_k", shape[1])], "q4_k", shape)
    noise = np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
    return w + noise * np.float32(0.01 * w.std())


# ------------------------------------------------------------------------------------------------- tests


def test_registry_matches_gguf():
    assert set(ALL) == {
        *("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"),
        *("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_k"),
    }
    for name, fmt in Q.FORMATS.items():
        assert fmt.ggml_type.name.lower() == name
        assert gguf.GGML_QUANT_SIZES[fmt.ggml_type] == (Q.block_size(name), Q.type_size(name))
        assert Q.type_name(Q.type_id(name)) == name and Q.type_id(name.upper()) == int(fmt.ggml_type)
        assert Q.get_format(fmt.ggml_type) is fmt
        assert Q.row_bytes(name, 4 * fmt.block_size) == 4 * fmt.type_size


@pytest.mark.parametrize("name", ALL)
def test_module_opens_with_its_byte_map(name):
    fmt = Q.FORMATS[name]
    module = inspect.getmodule(fmt.quantize_blocks)
    values = "1 value" if fmt.block_size == 1 else f"{fmt.block_size} values"
    line = f"# {name.upper()}: {values} in {fmt.type_size} bytes = {fmt.layout}"
    assert module.__doc__ and line in inspect.getsource(module), f"{module.__name__} lacks {line!r}"


@pytest.mark.parametrize("name", [n for n in ALL if n != "q8_k"])  # gguf has no Q8_K codec
def test_dequantize_random_blocks_matches_gguf(name):
    fmt = Q.FORMATS[name]
    b = random_blocks(fmt, 4096, np.random.default_rng(1))
    ours = Q.dequantize(b, name, (4096, fmt.block_size))
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(b, fmt.ggml_type)
    assert_same_floats(ours, ref, fmt.block_size, f"{name} dequantize vs gguf")


def test_dequantize_q8_k_is_d_times_q():
    b = random_blocks(Q.FORMATS["q8_k"], 64, np.random.default_rng(2))
    d = b[:, :4].copy().view(np.float32)
    q = b[:, 4:260].copy().view(np.int8).astype(np.float32)
    assert_same_floats(Q.dequantize(b, "q8_k", (64, 256)), d * q, 256, "q8_k dequantize")


@pytest.mark.parametrize("name", GGUF_QUANTIZERS)
def test_quantize_matches_gguf(name):
    fmt = Q.FORMATS[name]
    for case, x in awkward_inputs(np.random.default_rng(3), 64, 512).items():
        with np.errstate(all="ignore"):
            ref = gguf.quants.quantize(x, fmt.ggml_type)
        assert_same_bytes(Q.quantize(x, name), ref, fmt.type_size, f"{name} quantize vs gguf, {case}")


@needs_ggml
@pytest.mark.parametrize("name", ALL)
def test_quantize_matches_ggml_on_awkward_inputs(name):
    fmt = Q.FORMATS[name]
    inputs = awkward_inputs(np.random.default_rng(4), 32, 512)
    signed_zeros = np.where(np.random.default_rng(5).random((32, 512)) < 0.5, -0.0, 0.0)
    inputs["signed zeros"] = (signed_zeros * (np.random.default_rng(6).random((32, 512)) < 0.02)).astype(
        np.float32
    )
    for case, x in inputs.items():
        assert_same_bytes(
            Q.quantize(x, name), ggml_quantize(x, name), fmt.type_size, f"{name} vs ggml, {case}"
        )


@needs_ggml
@pytest.mark.parametrize("name", ALL)
def test_quantize_matches_ggml_on_real_weights(name):
    """Perturbed real weights: bit-exact bytes, hence the same round-trip RMSE as llama.cpp's quantizer."""
    fmt = Q.FORMATS[name]
    w = real_weights()
    ours, ref = Q.quantize(w, name), ggml_quantize(w, name)
    assert_same_bytes(ours, ref, fmt.type_size, f"{name} vs ggml on real weights")
    rmse = math.sqrt(float(np.mean((Q.dequantize(ours, name, w.shape) - w) ** 2)))
    rmse_ggml = math.sqrt(float(np.mean((Q.dequantize(ref, name, w.shape) - w) ** 2)))
    assert rmse <= rmse_ggml


def test_activation_quantizers_match_ggml_cpu_at_run_time():
    """What llama.cpp's x86 CPU backend feeds its dot products: Q8_K as the reference, Q8_0 its own rounding."""
    cpu = _load_ggml_cpu()
    if cpu is None:
        pytest.skip("needs llama-cpp-python on an x86 CPU with AVX")
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.standard_normal((256, 256)), rng.integers(-8, 9, (16, 256)) / 2.0])
    x = np.ascontiguousarray(x, dtype=np.float32)
    for name, fn, quantize_blocks in [
        ("q8_0", cpu.quantize_row_q8_0, Q.q8_0.quantize_blocks_x86),
        ("q8_k", cpu.quantize_row_q8_K, Q.q8_k.quantize_blocks),
    ]:
        fmt = Q.FORMATS[name]
        ref = np.zeros((x.size // fmt.block_size, fmt.type_size), dtype=np.uint8)
        fn(x.ctypes.data, ref.ctypes.data, x.size)
        ours = quantize_blocks(x.reshape(-1, fmt.block_size))
        assert_same_bytes(ours, ref, fmt.type_size, f"{name} vs ggml-cpu's run-time quantizer")


@pytest.mark.parametrize("model", ["qwen", "gemma"])
def test_every_real_tensor_dequantizes_like_gguf(model):
    """Tensors come from pyquant's reader (flat uint8 views of the mapped file); gguf-py decodes the same bytes."""
    seen = set()
    for tname, t in real_model(model).tensors.items():
        fmt = Q.FORMATS[t.type]
        ours = Q.dequantize(t.data, t.type, t.shape)
        assert ours.shape == tuple(t.shape) and ours.dtype == np.float32
        rows = t.data.reshape(-1, Q.row_bytes(t.type, t.shape[-1]))
        ref = gguf.quants.dequantize(rows, fmt.ggml_type)
        assert_same_floats(ours, ref, fmt.block_size, f"{model} {tname} ({t.type})")
        seen.add(t.type)
    assert {"q4_k", "q6_k", "q5_0", "q8_0", "f32"} <= seen


def test_k_quant_round_trip_error_is_small():
    """Sanity on the ladder: more bits, less error (relative RMSE on unit Gaussians)."""
    x = np.random.default_rng(7).standard_normal((16, 1024)).astype(np.float32)
    err = {n: float(np.sqrt(np.mean((Q.dequantize(Q.quantize(x, n), n, x.shape) - x) ** 2))) for n in ALL}
    ladder = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "f16", "f32"]
    assert all(err[a] > err[b] for a, b in itertools.pairwise(ladder)), err
    assert err["q4_k"] < 0.12 and err["q6_k"] < 0.03 and err["f32"] == 0.0


# ------------------------------------------------------------------------------------------------ the API


@pytest.mark.parametrize("name", ALL)
def test_shapes_round_trip(name):
    bs = Q.block_size(name)
    rng = np.random.default_rng(8)
    for shape in [(bs,), (3, 2 * bs), (2, 3, bs), (0, bs), (1, 1, 4 * bs)]:
        x = rng.standard_normal(shape)  # float64 in: converted to float32
        packed = Q.quantize(x, name)
        assert packed.dtype == np.uint8 and packed.shape == shape[:-1] + (Q.row_bytes(name, shape[-1]),)
        y = Q.dequantize(packed, name, shape)
        assert y.shape == shape and y.dtype == np.float32
        assert np.array_equal(
            Q.dequantize(packed.reshape(-1), name, list(shape)), y
        )  # flat bytes, list shape
    x = rng.standard_normal((4, 8 * bs)).astype(np.float32)
    strided = x[:, ::2]  # a non-contiguous view
    assert np.array_equal(Q.quantize(strided, name), Q.quantize(strided.copy(), name))


def test_dequantize_reads_memmap_views(tmp_path):
    x = np.random.default_rng(9).standard_normal((5, 512)).astype(np.float32)
    packed = Q.quantize(x, "q4_k")
    path = tmp_path / "t.bin"
    path.write_bytes(b"\0" * 7 + packed.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=7, shape=packed.shape)
    assert np.array_equal(Q.dequantize(mm, "q4_k", x.shape), Q.dequantize(packed, "q4_k", x.shape))
    f32 = Q.quantize(x, "f32")
    assert np.array_equal(
        Q.dequantize(f32.view(np.float32), "f32", x.shape), x
    )  # non-uint8 views: their bytes


def test_large_inputs_are_chunked_consistently():
    x = np.random.default_rng(10).standard_normal((3, Q._CHUNK_VALUES)).astype(np.float32)
    whole = Q.quantize(x, "q4_k")
    rows = np.stack([Q.quantize(r, "q4_k") for r in x])
    assert np.array_equal(whole, rows)


def one_line_error(fn, *args) -> str:
    with pytest.raises(PyquantError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors_are_one_line_and_helpful():
    msg = one_line_error(Q.quantize, np.zeros(32, np.float32), "q4_z")
    assert "'q4_z'" in msg and "q4_k" in msg and "q8_0" in msg
    assert "q4_k" in one_line_error(Q.type_id, "nope")
    assert "IQ2_XXS" in one_line_error(Q.type_name, int(gguf.GGMLQuantizationType.IQ2_XXS))
    assert "1000" in one_line_error(Q.block_size, 1000)
    assert "not a multiple" in one_line_error(Q.quantize, np.zeros((2, 100), np.float32), "q4_0")
    assert "not a multiple" in one_line_error(Q.row_bytes, "q6_k", 300)
    assert "scalar" in one_line_error(Q.quantize, np.float32(1.0), "f32")
    msg = one_line_error(Q.dequantize, np.zeros(100, np.uint8), "q4_0", (2, 64))
    assert "72 bytes" in msg and "100" in msg
    assert "not a multiple" in one_line_error(Q.dequantize, np.zeros(18, np.uint8), "q4_0", (16,))
    assert "shape" in one_line_error(Q.dequantize, np.zeros(0, np.uint8), "q4_0", ())
