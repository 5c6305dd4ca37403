"""The GGUF container: our reader against gguf-py's GGUFReader on the real models (values, types, shapes,
offsets, zero-copy views), writer round trips and atomicity, and an in-process fuzz over mutated real headers
(bench/fuzz_gguf.py holds the engine; run it there for many more cases). Hostile files through the
`pyquant inspect` command line are in test_inspect.py."""

from __future__ import annotations

import mmap
import os
import re

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pyquant.errors import PyquantError
from pyquant.gguf import GGUFFile, write_gguf
from pyquant.gguf.writer import TensorSpec

V, T = GGUFValueType, GGMLQuantizationType


# ---------------------------------------------------------------- reader vs gguf-py, real models


@pytest.fixture(scope="module")
def pair(real_model, oracle):
    return GGUFFile(real_model), oracle(real_model)


def test_header_matches_gguf_py(pair):
    ours, ref = pair
    assert ours.version == ref.fields["GGUF.version"].contents() == 3
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset


def test_metadata_matches_gguf_py(pair):
    ours, ref = pair
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, f in fields.items():
        sub = f.types[-1] if f.types[0] == V.ARRAY else None
        assert ours.metadata_types[key] == (f.types[0], sub), key
        got = ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        assert type(got) is type(f.contents()) and got == f.contents(), key


def test_tensors_match_gguf_py(pair):
    ours, ref = pair
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for rt in ref.tensors:
        t = ours.tensors[rt.name]
        assert t.type == rt.tensor_type.name.lower(), rt.name
        assert t.shape == tuple(int(d) for d in reversed(rt.shape)), rt.name  # numpy order
        assert (t.offset, t.nbytes, t.n_elements) == (rt.data_offset, rt.n_bytes, rt.n_elements), rt.name
        ref_data = np.asarray(rt.data)
        assert np.array_equal(t.data, ref_data.reshape(-1).view(np.uint8)), rt.name
        a = t.array()  # typed view: float32 in numpy order, or (rows, bytes per row) for block formats
        rows = ref_data.size // ref_data.shape[-1]
        assert a.shape == (t.shape if t.type == "f32" else (rows, ref_data.shape[-1])), rt.name
        same = a.dtype == ref_data.dtype and np.array_equal(a.reshape(ref_data.shape)[:2], ref_data[:2])
        assert same, rt.name


def _bases(a):
    while a is not None:
        yield a
        a = getattr(a, "base", None)


def test_tensor_views_are_zero_copy(pair):
    ours, _ = pair
    start = ours.buf.ctypes.data
    for t in ours.tensors.values():
        for view in (t.data, t.array()):
            assert np.shares_memory(view, ours.buf) and not view.flags.writeable, t.name
            assert view.ctypes.data == start + t.offset, t.name  # the bytes at the offset, not a copy
            assert any(isinstance(b, mmap.mmap) for b in _bases(view)), t.name


# ---------------------------------------------------------------- writer

ALL_VALUES = {  # key -> (value, (type, element type)): every scalar type, its extremes, and arrays of each
    "t.u8": (255, (V.UINT8, None)),
    "t.i8": (-128, (V.INT8, None)),
    "t.u16": (65535, (V.UINT16, None)),
    "t.i16": (-32768, (V.INT16, None)),
    "t.u32": (2**32 - 1, (V.UINT32, None)),
    "t.i32": (-(2**31), (V.INT32, None)),
    "t.u64": (2**64 - 1, (V.UINT64, None)),
    "t.i64": (-(2**63), (V.INT64, None)),
    "t.f32": (-1.5, (V.FLOAT32, None)),
    "t.f64": (1e300, (V.FLOAT64, None)),
    "t.bool": (True, (V.BOOL, None)),
    "t.str": ("héllo ✓ 日本\n\t\"'", (V.STRING, None)),
    "t.empty_str": ("", (V.STRING, None)),
    "a.u8": ([0, 7, 255], (V.ARRAY, V.UINT8)),
    "a.i8": ([-128, 0, 127], (V.ARRAY, V.INT8)),
    "a.u16": ([0, 65535], (V.ARRAY, V.UINT16)),
    "a.i16": ([-32768, 32767], (V.ARRAY, V.INT16)),
    "a.u32": ([0, 2**32 - 1], (V.ARRAY, V.UINT32)),
    "a.i32": ([-(2**31), 2**31 - 1], (V.ARRAY, V.INT32)),
    "a.u64": ([0, 2**64 - 1], (V.ARRAY, V.UINT64)),
    "a.i64": ([-(2**63), 2**63 - 1], (V.ARRAY, V.INT64)),
    "a.f32": ([0.5, -2.25, 3e38], (V.ARRAY, V.FLOAT32)),
    "a.f64": ([1e-300, -1e300], (V.ARRAY, V.FLOAT64)),
    "a.bool": ([True, False, True], (V.ARRAY, V.BOOL)),
    "a.str": (["a", "", "ü日", "x" * 300], (V.ARRAY, V.STRING)),
    "a.empty": ([], (V.ARRAY, V.INT32)),
    "a.empty_str": ([], (V.ARRAY, V.STRING)),
}
ROUND_TRIP_TENSORS = [  # (name, type, numpy shape): several block formats and ranks
    ("w.f32", "f32", (3, 8)),
    ("w.f16", "f16", (2, 3, 4)),
    ("w.bf16", "bf16", (16,)),
    ("w.q8_0", "q8_0", (4, 64)),
    ("w.q4_0", "q4_0", (2, 2, 2, 32)),
    ("w.q5_0", "q5_0", (1, 96)),
    ("w.q4_k", "q4_k", (3, 512)),
    ("w.q6_k", "q6_k", (2, 256)),
    ("w.i32", "i32", (5,)),
]


def _packed(ttype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[T[ttype.upper()]]
    return np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) // block * size, dtype=np.uint8)


def _specs(tensors=ROUND_TRIP_TENSORS) -> list[TensorSpec]:
    return [
        TensorSpec(n, t, s, lambda i=i, t=t, s=s: _packed(t, s, i)) for i, (n, t, s) in enumerate(tensors)
    ]


@pytest.mark.parametrize("alignment", [32, 64])
def test_writer_round_trip(tmp_path, alignment):
    metadata = {"general.architecture": "llama", **{k: v for k, (v, _) in ALL_VALUES.items()}}
    types = {k: t for k, (_, t) in ALL_VALUES.items()}
    if alignment != 32:
        metadata["general.alignment"] = alignment
    path = write_gguf(tmp_path / "rt.gguf", metadata, _specs(), types=types)

    ours, ref = GGUFFile(path), GGUFReader(path)
    assert ours.alignment == ref.alignment == alignment
    for key, (value, vtypes) in ALL_VALUES.items():
        got = ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        if V.FLOAT32 in vtypes:  # stored as float32: compare with the rounded value
            value = np.asarray(value, dtype=np.float32).tolist()
        assert ours.metadata_types[key] == vtypes, key
        assert got == ref.fields[key].contents() == value, key
    assert ours.metadata["general.architecture"] == "llama"
    assert [t.name for t in ref.tensors] == list(ours.tensors) == [n for n, _, _ in ROUND_TRIP_TENSORS]
    for i, ((name, ttype, shape), rt) in enumerate(zip(ROUND_TRIP_TENSORS, ref.tensors)):
        t = ours.tensors[name]
        assert (t.type, t.shape) == (ttype, shape) and rt.tensor_type == T[ttype.upper()]
        assert tuple(int(d) for d in reversed(rt.shape)) == shape
        assert t.offset == rt.data_offset and t.offset % alignment == 0
        assert np.array_equal(t.data, _packed(ttype, shape, i))
        assert np.array_equal(np.asarray(rt.data).reshape(-1).view(np.uint8), t.data)


def test_writer_round_trips_a_real_header(tmp_path, qwen_path):
    """The real metadata, vocabulary included, through write_gguf and back: equal values and types."""
    src = GGUFFile(qwen_path)
    path = write_gguf(
        tmp_path / "meta.gguf", src.metadata, _specs(ROUND_TRIP_TENSORS[:2]), types=src.metadata_types
    )
    back = GGUFFile(path)
    assert back.metadata_types == src.metadata_types
    for key, value in src.metadata.items():
        same = (
            np.array_equal(value, back.metadata[key])
            if isinstance(value, np.ndarray)
            else value == back.metadata[key]
        )
        assert same, key


def test_writer_without_tensors(tmp_path):
    path = write_gguf(tmp_path / "empty.gguf", {"general.architecture": "llama"}, [])
    assert GGUFFile(path).tensors == {} and GGUFReader(path).tensors == []


def test_writer_plain_arrays_and_mode(tmp_path):
    """f32 arrays are accepted as produced; the output has the mode open() gives, not mkstemp's 0600."""
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    path = write_gguf(
        tmp_path / "x.gguf", {"general.architecture": "llama"}, [TensorSpec("x", "f32", (3, 8), lambda: x)]
    )
    assert np.array_equal(GGUFFile(path).tensor("x").array(), x)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_writer_failure_leaves_target_untouched(tmp_path, exc):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"previous contents" * 1000)
    before = target.read_bytes()

    def boom():
        raise exc("produce failed mid-write")

    specs = _specs()[:3] + [TensorSpec("boom", "f32", (4,), boom)] + _specs()[3:]
    with pytest.raises(exc):
        write_gguf(target, {"general.architecture": "llama"}, specs)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.gguf"]  # no temp file left behind


def test_writer_wrong_byte_count_is_an_error_and_atomic(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    bad = [TensorSpec("w", "q4_k", (2, 256), lambda: np.zeros(100, np.uint8))]
    with pytest.raises(PyquantError, match=r"'w': produced 100 bytes, q4_k \(2, 256\) needs 288"):
        write_gguf(target, {"general.architecture": "llama"}, bad)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.gguf"]


X = {"general.architecture": "x"}


@pytest.mark.parametrize(
    "where, metadata, specs, message",
    [
        ("missing/out.gguf", X, [], "does not exist"),
        ("", X, [], "is a directory"),
        ("out.gguf", {}, [], "needs general.architecture"),
        ("out.gguf", X, [TensorSpec("w", "q9_z", (32,), None)], "unknown ggml type"),
        ("out.gguf", X, [TensorSpec("w", "q4_k", (2, 100), None)], "not a multiple"),
        ("out.gguf", X, [TensorSpec("w", "f32", (), None)], "1 to 4 positive"),
        ("out.gguf", X, [TensorSpec("w", "f32", (1,), None)] * 2, "duplicate tensor"),
        ("out.gguf", {**X, "k": 2**70}, [], "does not fit"),
        ("out.gguf", {**X, "k": [1, "a"]}, [], "one scalar type"),
        ("out.gguf", {**X, "k": object()}, [], "cannot store"),
        ("out.gguf", {**X, "general.alignment": 48}, [], "power of two"),
    ],
)
def test_writer_bad_input_is_a_pyquant_error(tmp_path, where, metadata, specs, message):
    with pytest.raises(PyquantError, match=message):
        write_gguf(tmp_path / where, metadata, specs)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


# ---------------------------------------------------------------- fuzz (bench/fuzz_gguf.py for more)

FUZZ_CASES, FUZZ_FULL_CASES = 3000, 12


def test_fuzz_real_headers(tmp_path, fuzz_gguf, qwen_header, gemma_path):
    """Mutated real headers: each case opens or raises GGUFError, never anything else, and quickly."""
    fuzz = fuzz_gguf
    small, _ = fuzz.build_corpus(tmp_path, full=False)
    results = fuzz.fuzz(small, FUZZ_CASES, seed=1234, workdir=tmp_path, limit=5.0)
    results += fuzz.fuzz(
        [qwen_header[0], fuzz.real_header_seed(gemma_path)], FUZZ_FULL_CASES, 99, tmp_path, 10.0
    )
    report = fuzz.summary(results)
    crashes = [r for r in results if r.outcome == "crash"]
    assert not crashes, (
        report + "\n\n" + "\n".join(f"{r.path} ({r.kinds}):\n{r.message}" for r in crashes[:3])
    )
    assert sum(r.outcome == "error" for r in results) > len(results) // 2, report  # the mutations do bite
    slow_small = max(r.seconds for r in results[:FUZZ_CASES])
    slow_full = max(r.seconds for r in results[FUZZ_CASES:])
    assert slow_small < 1.0 and slow_full < 5.0, report
    kinds = {fuzz.message_kind(r.message) for r in results if r.outcome == "error"}
    assert not [k for k in kinds if re.search(r"[\x00-\x1f]", k)], kinds  # messages stay printable one-liners
