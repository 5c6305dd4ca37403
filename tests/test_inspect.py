"""`pyquant inspect`: on the real models its table, per-type totals, bits per weight, parameter count and
`--json` object are checked against gguf-py's GGUFReader; on hostile files (hand-built with a small byte
builder, and one-field edits and cuts of the real qwen header) it must exit 2 with one stderr line
`pyquant: error: ...` naming the problem, and the reader must fail fast without a large allocation."""

from __future__ import annotations

import json
import os
import re
import struct
import time
import tracemalloc
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType, GGUFValueType

from pyquant.errors import GGUFError
from pyquant.gguf import GGUFFile

V, T = GGUFValueType, GGMLQuantizationType


# ---------------------------------------------------------------- hostile files: a byte builder


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def ti(name: str | bytes, dims, ttype: int, offset: int) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def gguf(kvs=(), tis=(), data=b"", *, n_kv=None, n_tensors=None, version=3, magic=b"GGUF", align=32) -> bytes:
    n_t, n_k = len(tis) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    head = magic + struct.pack("<IQQ", version, n_t, n_k) + b"".join(kvs) + b"".join(tis)
    return head + bytes(-len(head) % align) + data


u32, u64 = (lambda v: struct.pack("<I", v)), (lambda v: struct.pack("<Q", v))
ARCH = kv("general.architecture", V.STRING, gstr("llama"))
TA = ti("a", [8, 2], T.F32, 0)  # 64 bytes at 0
TB = ti("b", [32], T.Q8_0, 64)  # 34 bytes at 64
DATA = bytes(range(98))


def with_tensors(*tis, kvs=(ARCH,), data=DATA, **kw) -> bytes:
    return gguf(kvs, tis, data, **kw)


VALID = with_tensors(TA, TB)
HOSTILE = {  # id -> (bytes, what the one-line error must say)
    "empty": (b"", "truncated file: 0 bytes"),
    "short": (VALID[:20], "truncated file: 20 bytes"),
    "magic": (b"GGML" + VALID[4:], "bad magic"),
    "version-1": (with_tensors(TA, version=1), "unsupported GGUF version 1 "),
    "version-99": (with_tensors(TA, version=99), "unsupported GGUF version 99 "),
    "version-big-endian": (with_tensors(TA, version=0x03000000), "unsupported GGUF version 50331648"),
    "offset-past-end": (with_tensors(TA, ti("b", [32], T.Q8_0, 1 << 20)), "runs past the end"),
    "offset-u64-max": (with_tensors(TA, ti("b", [32], T.Q8_0, 2**64 - 32)), "runs past the end"),
    "offset-unaligned": (with_tensors(TA, ti("b", [32], T.Q8_0, 65)), "offset 65 is not aligned to 32"),
    "overlap": (with_tensors(TA, ti("b", [32], T.Q8_0, 32)), "tensors 'a' and 'b' overlap"),
    "overlap-same-offset": (with_tensors(TA, ti("b", [8, 2], T.F32, 0)), "overlap at offset"),
    "dim-zero": (with_tensors(ti("a", [8, 0], T.F32, 0)), "'a' has bad dimension 0"),
    "dim-u64-max": (with_tensors(ti("a", [2**64 - 1], T.F32, 0)), "bad dimension 18446744073709551615"),
    "dims-overflow-2^80": (with_tensors(ti("a", [2**40, 2**40], T.F32, 0)), "element count overflows"),
    "dims-overflow-4d": (with_tensors(ti("a", [2**16] * 4, T.F32, 0)), "element count overflows"),
    "n-dims-0": (with_tensors(ti("a", [], T.F32, 0)), "'a' has 0 dimensions"),
    "n-dims-9": (with_tensors(ti("a", [1] * 9, T.F32, 0)), "'a' has 9 dimensions"),
    "n-dims-u32-max": (with_tensors(gstr("a") + u32(2**32 - 1) + bytes(40)), "4294967295 dimensions"),
    "type-99": (with_tensors(ti("a", [8, 2], 99, 0)), "'a' has unknown ggml type id 99"),
    "type-removed-4": (with_tensors(ti("a", [8, 2], 4, 0)), "unknown ggml type id 4"),
    "type-u32-max": (with_tensors(ti("a", [8, 2], 2**32 - 1, 0)), "unknown ggml type id 4294967295"),
    "row-not-block-multiple": (
        with_tensors(ti("b", [100], T.Q8_0, 0)),
        "row length 100 is not a multiple of q8_0",
    ),
    "row-not-k-block-multiple": (
        with_tensors(ti("k", [128, 2], T.Q4_K, 0)),
        "not a multiple of q4_k block size 256",
    ),
    "key-length-2^63": (
        gguf([u64(2**63) + b"x" * 40]),
        "bad string length 9223372036854775808 for metadata key",
    ),
    "key-length-past-end": (gguf([u64(200) + b"general"], n_kv=1), "bad string length 200 for metadata key"),
    "value-length-past-end": (
        gguf([kv("k", V.STRING, u64(50) + b"abc")], n_kv=1),
        "bad string length 50 for value",
    ),
    "tensor-name-length-huge": (
        with_tensors(u64(2**62)),
        "bad string length 4611686018427387904 for tensor name",
    ),
    "duplicate-key": (with_tensors(TA, kvs=(ARCH, ARCH)), "duplicate metadata key 'general.architecture'"),
    "duplicate-tensor": (with_tensors(TA, ti("a", [32], T.Q8_0, 64)), "duplicate tensor name 'a'"),
    "kv-count-u64-max": (with_tensors(TA, n_kv=2**64 - 1), "metadata count 18446744073709551615 cannot fit"),
    "kv-count-1000": (with_tensors(TA, n_kv=1000), "metadata count 1000 cannot fit"),
    "tensor-count-u64-max": (
        with_tensors(TA, n_tensors=2**64 - 1),
        "tensor count 18446744073709551615 cannot",
    ),
    "tensor-count-2^32": (with_tensors(TA, n_tensors=2**32), "tensor count 4294967296 cannot fit"),
    "array-count-huge-u8": (
        gguf([kv("k", V.ARRAY, u32(V.UINT8) + u64(2**62))]),
        "array length 4611686018427387904",
    ),
    "array-count-wraps-u64": (
        gguf([kv("k", V.ARRAY, u32(V.UINT64) + u64(2**61) + bytes(8))]),
        "array length 2305",
    ),
    "array-count-huge-str": (
        gguf([kv("k", V.ARRAY, u32(V.STRING) + u64(2**60))]),
        "array length 1152921504606846976",
    ),
    "array-string-past-end": (
        gguf([kv("k", V.ARRAY, u32(V.STRING) + u64(2) + gstr("a") + u64(99))]),
        "bad string length 99 for element 1 of 'k'",
    ),
    "value-type-99": (gguf([kv("k", 99, bytes(8))]), "unknown value type 99 for 'k'"),
    "value-type-u32-max": (gguf([kv("k", 2**32 - 1, bytes(8))]), "unknown value type 4294967295"),
    "array-type-13": (gguf([kv("k", V.ARRAY, u32(13) + u64(1) + bytes(8))]), "unknown value type 13"),
    "nested-array": (
        gguf([kv("k", V.ARRAY, u32(V.ARRAY) + u64(1) + u32(V.UINT8) + u64(1) + b"\1")]),
        "nested arrays",
    ),
    "key-not-utf8": (gguf([kv(b"gen\xffral", V.UINT8, b"\1")]), "metadata key is not valid UTF-8"),
    "value-not-utf8": (gguf([kv("k", V.STRING, gstr(b"\xc3\x28"))]), "value of 'k' is not valid UTF-8"),
    "array-item-not-utf8": (
        gguf([kv("k", V.ARRAY, u32(V.STRING) + u64(2) + gstr("a") + gstr(b"\xed\xa0\x80"))]),
        "element 1 of 'k' is not valid UTF-8",
    ),
    "tensor-name-not-utf8": (with_tensors(ti(b"\xff", [8, 2], T.F32, 0)), "tensor name is not valid UTF-8"),
    "tensor-name-64-bytes": (with_tensors(ti("n" * 64, [8, 2], T.F32, 0)), "is 64 bytes (at most 63)"),
    "key-with-newline": (gguf([kv("bad\nkey\u2028", 99, bytes(8))]), "for 'bad\\nkey\\u2028'"),
    "alignment-0": (
        with_tensors(TA, kvs=(ARCH, kv("general.alignment", V.UINT32, u32(0)))),
        "alignment 0 is not",
    ),
    "alignment-3": (
        with_tensors(TA, kvs=(ARCH, kv("general.alignment", V.UINT32, u32(3)))),
        "alignment 3 is not",
    ),
    "alignment-u64": (
        with_tensors(TA, kvs=(ARCH, kv("general.alignment", V.UINT64, u64(32)))),
        "must be a uint32",
    ),
    "data-start-past-end": (with_tensors(TA, data=b"")[:-4], "tensor data would start at"),
    "cut-in-data": (VALID[:-1], "'b' data [224, 258) runs past the end of the 257-byte file"),
}
FAST_SECONDS, SMALL_ALLOCATION = 1.0, 16 << 20  # a small file: fail within a second, no big buffers
REAL_SECONDS = 3.0  # a real header: its 6 MB vocabulary may be parsed first (~0.2 s idle, more on a busy box)


def test_builder_makes_valid_files(tmp_path):
    (tmp_path / "ok.gguf").write_bytes(VALID)
    ours, ref = GGUFFile(tmp_path / "ok.gguf"), GGUFReader(tmp_path / "ok.gguf")
    assert [(t.name, t.type, t.shape, t.offset) for t in ours.tensors.values()] == [
        (t.name, t.tensor_type.name.lower(), tuple(int(d) for d in reversed(t.shape)), t.data_offset)
        for t in ref.tensors
    ]


def _open_quickly(path: Path) -> str:
    """GGUFFile(path) must raise GGUFError within a second and without a large allocation: its message."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(GGUFError) as err:
            GGUFFile(path)
    finally:
        elapsed, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < FAST_SECONDS and peak < SMALL_ALLOCATION, (elapsed, peak)
    return str(err.value)


def assert_one_line_error(proc, expect: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyquant: error:"), proc.stderr
    assert expect in lines[0], lines[0]


# ---------------------------------------------------------------- hostile files: mutated real headers


def _tensor(lay, i: int) -> dict[str, int]:
    return list(lay.tensors.values())[i]


def _first_q4_k(lay, head: bytes) -> dict[str, int]:
    return next(e for e in lay.tensors.values() if struct.unpack_from("<I", head, e["type_at"])[0] == T.Q4_K)


def _kv(key: str, what: str, extra: int = 0):
    return lambda lay, head: lay.kv[key][what] + extra


REAL_EDITS = {  # id -> (where in the real qwen header, the bytes written there, what the error must say)
    "real-magic": (lambda lay, head: 0, b"GGML", "bad magic"),
    "real-version-1": (lambda lay, head: 4, u32(1), "unsupported GGUF version 1 "),
    "real-version-99": (lambda lay, head: 4, u32(99), "unsupported GGUF version 99 "),
    "real-tensor-count-2^62": (
        lambda lay, head: 8,
        u64(2**62),
        "tensor count 4611686018427387904 cannot fit",
    ),
    "real-kv-count-u64-max": (lambda lay, head: 16, u64(2**64 - 1), "metadata count 18446744073709551615"),
    "real-key-length-2^63": (
        _kv("general.architecture", "at"),
        u64(2**63),
        "bad string length 9223372036854775808 for metadata key",
    ),
    "real-key-not-utf8": (_kv("general.type", "at", 8), b"\xff", "metadata key is not valid UTF-8"),
    "real-duplicate-key": (
        _kv("general.type", "at", 8),
        b"general.name",
        "duplicate metadata key 'general.name'",
    ),
    "real-value-type-99": (_kv("qwen2.block_count", "vtype_at"), u32(99), "unknown value type 99"),
    "real-nested-array": (_kv("tokenizer.ggml.token_type", "value_at"), u32(V.ARRAY), "nested arrays"),
    "real-vocab-count-2^60": (
        _kv("tokenizer.ggml.tokens", "count_at"),
        u64(2**60),
        "array length 1152921504606846976",
    ),
    "real-token-length-2^40": (
        _kv("tokenizer.ggml.tokens", "count_at", 8),
        u64(2**40),
        "element 0 of 'tokenizer",
    ),
    "real-duplicate-tensor": (
        lambda lay, head: lay.tensors["blk.0.attn_k.bias"]["at"] + 8,
        b"blk.0.attn_q.bias",
        "duplicate tensor name 'blk.0.attn_q.bias'",
    ),
    "real-n-dims-0": (lambda lay, head: _tensor(lay, 0)["n_dims_at"], u32(0), "has 0 dimensions"),
    "real-n-dims-9": (lambda lay, head: _tensor(lay, 0)["n_dims_at"], u32(9), "has 9 dimensions"),
    "real-dim-zero": (lambda lay, head: _tensor(lay, 0)["dims_at"], u64(0), "bad dimension 0"),
    "real-dims-2^40x2^40": (
        lambda lay, head: _tensor(lay, 0)["dims_at"],
        u64(2**40) * 2,
        "element count overflows",
    ),
    "real-type-99": (lambda lay, head: _tensor(lay, 0)["type_at"], u32(99), "unknown ggml type id 99"),
    "real-row-not-multiple": (
        lambda lay, head: _first_q4_k(lay, head)["dims_at"],
        u64(100),
        "row length 100 is not a multiple of q4_k block size 256",
    ),
    "real-offset-past-end": (
        lambda lay, head: _tensor(lay, -1)["offset_at"],
        u64(2**50),
        "runs past the end",
    ),
    "real-offset-unaligned": (
        lambda lay, head: _tensor(lay, 5)["offset_at"],
        u64(32001),
        "is not aligned to 32",
    ),
    "real-overlap": (lambda lay, head: _tensor(lay, 1)["offset_at"], u64(0), "overlap"),  # tensor 0 is at 0
}


def _real_mutations(seed, lay) -> dict[str, tuple[bytes, int, str]]:
    """id -> (bytes, file size, expected message) of the one-field edits of the real header."""
    assert struct.unpack_from("<Q", seed.head, _tensor(lay, 0)["offset_at"])[0] == 0
    out = {}
    for case, (where, raw, expect) in REAL_EDITS.items():
        pos = where(lay, seed.head)
        out[case] = (seed.head[:pos] + raw + seed.head[pos + len(raw) :], seed.size, expect)
    return out


def _real_cuts(seed, lay) -> list[int]:
    """Cut points across the real header (each kind of field, the vocabulary, the padding) and the data."""
    keys = list(lay.kv.values())
    kv_points = [e["at"] + d for e in keys[::3] for d in (0, 9)] + [e["vtype_at"] + 5 for e in keys[1::3]]
    vocab = lay.kv["tokenizer.ggml.tokens"]["count_at"]
    tensors = list(lay.tensors.values())
    t_points = [e[f] + 2 for e, f in zip(tensors, ("at", "n_dims_at", "dims_at", "type_at", "offset_at"))]
    in_data = [len(seed.head), len(seed.head) + 1, seed.size // 2, seed.size - 1]
    ends = [lay.end - 1, lay.end + 1]  # in the last tensor info, in the padding before the data
    return sorted(
        {0, 3, 4, 7, 8, 16, 23, 24, 31, vocab + 10, vocab + 100_000, *ends, *kv_points, *t_points, *in_data}
    )


def _expect_cut(seed, cut: int) -> str:
    return "runs past the end" if cut >= len(seed.head) else "truncated"


# Through the CLI in a fresh interpreter (~0.3 s each): every hand-built case, a sample of the real ones.
REAL_CLI = {"real-magic", "real-kv-count-u64-max", "real-vocab-count-2^60", "real-nested-array"}
REAL_CLI |= {"real-duplicate-tensor", "real-dims-2^40x2^40", "real-offset-unaligned", "real-overlap"}


def _cli_cuts(seed, lay) -> list[int]:
    vocab = lay.kv["tokenizer.ggml.tokens"]["count_at"]
    return [0, 23, 31, vocab + 100_000, lay.end + 1, len(seed.head) + 1]


def _write_case(path: Path, data: bytes, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.write(data)
        if size > len(data):
            fh.truncate(size)  # sparse: the real data region costs no disk
    return path


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory, qwen_header):
    """id -> (path, expected message) for every hand-built and real-header case."""
    root = tmp_path_factory.mktemp("hostile")
    seed, lay = qwen_header
    cases = {k: (data, len(data), msg) for k, (data, msg) in HOSTILE.items()} | _real_mutations(seed, lay)
    cases |= {
        f"real-cut-{cut}": (seed.head[:cut], cut, _expect_cut(seed, cut)) for cut in _cli_cuts(seed, lay)
    }
    return {k: (_write_case(root / f"{k}.gguf", d, size), msg) for k, (d, size, msg) in cases.items()}


@pytest.fixture(scope="module")
def cli_results(hostile_files, cli):
    """`pyquant inspect` on the CLI cases, as many at once as there are cores."""
    todo = [
        k for k in hostile_files if not k.startswith("real-") or k in REAL_CLI or k.startswith("real-cut-")
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        runs = {k: pool.submit(cli, "inspect", str(hostile_files[k][0])) for k in todo}
    return {k: r.result() for k, r in runs.items()}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file(case, hostile_files, cli_results):
    path, expect = hostile_files[case]
    message = _open_quickly(path)
    assert expect in message and str(path) in message and "\n" not in message, message
    assert_one_line_error(cli_results[case], expect)


@pytest.mark.parametrize("case", list(REAL_EDITS))
def test_real_header_edit(case, hostile_files, cli_results):
    """One field of the real header made hostile: the error names it, after at most a vocabulary's parse."""
    path, expect = hostile_files[case]
    t0 = time.perf_counter()
    message = str(pytest.raises(GGUFError, GGUFFile, path).value)
    assert time.perf_counter() - t0 < REAL_SECONDS
    assert expect in message and str(path) in message and "\n" not in message, message
    if case in REAL_CLI:
        assert_one_line_error(cli_results[case], expect)


def test_hostile_cli_truncations(hostile_files, cli_results):
    cuts = [k for k in cli_results if k.startswith("real-cut-")]
    assert len(cuts) == 6
    for k in cuts:
        assert_one_line_error(cli_results[k], hostile_files[k][1])


def test_truncated_real_header_everywhere(tmp_path, qwen_header):
    """Every cut of the real file, in the header and in the data, is a GGUFError saying it is truncated."""
    seed, lay = qwen_header
    for i, cut in enumerate(_real_cuts(seed, lay)):
        path = _write_case(tmp_path / f"cut{i}.gguf", seed.head[:cut], cut)
        t0 = time.perf_counter()
        with pytest.raises(GGUFError, match=r"truncated") as err:
            GGUFFile(path)
        assert time.perf_counter() - t0 < REAL_SECONDS, cut
        assert _expect_cut(seed, cut) in str(err.value), (cut, err.value)
        path.unlink()


def test_inspect_json_is_strict_with_nan_metadata(cli, tmp_path):
    nan, inf = struct.pack("<f", float("nan")), struct.pack("<f", float("inf"))
    scores = kv("s", V.ARRAY, u32(V.FLOAT32) + u64(3) + nan + inf + struct.pack("<f", -1.5))
    path = tmp_path / "nan.gguf"
    path.write_bytes(gguf([ARCH, kv("x", V.FLOAT32, nan), scores]))
    proc = cli("inspect", "--json", str(path))
    meta = json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))["metadata"]
    assert proc.returncode == 0 and meta["x"] == "nan" and meta["s"] == ["nan", "inf", -1.5]
    assert "[nan, inf, -1.5]" in cli("inspect", str(path)).stdout


def test_missing_file_and_folder(cli, tmp_path):
    assert_one_line_error(cli("inspect", str(tmp_path / "nope.gguf")), "No such file")
    assert_one_line_error(cli("inspect", str(tmp_path)), "not a regular file")


# ---------------------------------------------------------------- the real models


@pytest.fixture(scope="module")
def inspected(real_model, oracle, cli):
    """(gguf-py's reader, `pyquant inspect --tensors` stdout, `--json` stdout, path) of a real model."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(cli, "inspect", *flags, str(real_model)) for flags in (["--tensors"], ["--json"])]
        ref = oracle(real_model)
    text, js = (r.result() for r in runs)
    for proc in (text, js):
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return ref, text.stdout, js.stdout, real_model


def _sections(stdout: str) -> dict[str, list[str]]:
    """Blocks of the text output keyed by their first word ("metadata", "tensors", "per", "parameters")."""
    blocks = [b.splitlines() for b in stdout.strip().split("\n\n")]
    return {"head": blocks[0], **{b[0].split()[0].rstrip(":"): b for b in blocks[1:]}}


def _metadata(ref) -> dict:
    return {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}


def _per_type(ref) -> dict[str, tuple[int, int, int]]:
    out: dict[str, list[int]] = {}
    for t in ref.tensors:
        row = out.setdefault(t.tensor_type.name.lower(), [0, 0, 0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + int(t.n_elements), row[2] + int(t.n_bytes)
    return {k: tuple(v) for k, v in out.items()}


def test_inspect_summary_line(inspected):
    ref, stdout, *_ = inspected
    head = _sections(stdout)["head"][0]
    counts = f"{len(_metadata(ref))} metadata keys, {len(ref.tensors)} tensors"
    want = f"GGUF v3, {counts}, data at offset {ref.data_offset}"
    assert want in head and head.endswith(f"alignment {ref.alignment}")


def test_inspect_lists_every_key_with_its_type(inspected):
    ref, stdout, *_ = inspected
    rows = [line.split()[:2] for line in _sections(stdout)["metadata"][1:]]
    assert rows == [[k, f.types[0].name.lower()] for k, f in _metadata(ref).items()]


def test_inspect_table_lists_every_tensor(inspected):
    ref, stdout, *_ = inspected
    rows = [line.split() for line in _sections(stdout)["tensors"][2:]]
    want = [
        [
            t.name,
            t.tensor_type.name.lower(),
            "x".join(str(int(d)) for d in reversed(t.shape)),
            f"{int(t.n_bytes):,}",
        ]
        for t in ref.tensors
    ]
    assert rows == want
    assert Counter(r[1] for r in rows) == Counter(t.tensor_type.name.lower() for t in ref.tensors)


def test_inspect_totals_per_type(inspected):
    ref, stdout, *_ = inspected
    rows = [line.split() for line in _sections(stdout)["per"][2:]]
    want = sorted(_per_type(ref).items(), key=lambda kv: -kv[1][2])
    assert rows == [[k, str(n), f"{p:,}", f"{b:,}", f"{8 * b / p:.2f}"] for k, (n, p, b) in want]
    bpw = {k: 8 * b / p for k, (n, p, b) in want}
    assert bpw["f32"] == 32 and bpw["q8_0"] == 8.5 and bpw["q4_k"] == 4.5 and bpw["q6_k"] == 6.5625


# Hugging Face model cards: Qwen2.5-0.5B has 494,032,768 parameters with tied embeddings (this GGUF also
# stores output.weight, 151936 x 896); gemma-3-270m has 268,098,176.
PUBLISHED_PARAMS = {"qwen": 494_032_768 + 151_936 * 896, "gemma": 268_098_176}


def test_inspect_parameter_count(inspected):
    ref, stdout, _, path = inspected
    n_params = sum(int(t.n_elements) for t in ref.tensors)
    n_bytes = sum(int(t.n_bytes) for t in ref.tensors)
    line = _sections(stdout)["parameters"][0]
    assert line.startswith(f"parameters: {n_params:,} ({n_params / 1e9:.3f} B)")
    assert f"tensor bytes: {n_bytes:,}" in line
    assert line.endswith(f"bits per weight: {8 * n_bytes / n_params:.3f}")
    model = "qwen" if "qwen" in path.name else "gemma"
    assert n_params == PUBLISHED_PARAMS[model]


def test_tensor_bytes_tile_the_data(inspected):
    """The byte counts behind the totals are right: tensors follow each other, padded to the alignment."""
    ref, *_ = inspected
    spans = sorted((int(t.data_offset), int(t.n_bytes)) for t in ref.tensors)
    padded = [-(-n // ref.alignment) * ref.alignment for _, n in spans]
    assert [o for o, _ in spans] == [ref.data_offset + sum(padded[:i]) for i in range(len(spans))]
    assert spans[-1][0] + spans[-1][1] <= len(ref.data)


def test_inspect_json(inspected):
    ref, _, stdout, _ = inspected
    obj = json.loads(stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert set(obj) == {"metadata", "tensors"}
    fields = _metadata(ref)
    assert list(obj["metadata"]) == list(fields)
    for key, f in fields.items():
        assert obj["metadata"][key] == f.contents(), key
    assert obj["tensors"] == [
        {
            "name": t.name,
            "type": t.tensor_type.name.lower(),
            "shape": [int(d) for d in reversed(t.shape)],
            "nbytes": int(t.n_bytes),
            "offset": int(t.data_offset),
        }
        for t in ref.tensors
    ]
    assert all(re.fullmatch(r"[a-z0-9_]+", t["type"]) for t in obj["tensors"])


def test_inspect_table_is_cut_without_tensors_flag(cli, gemma_path):
    proc = cli("inspect", str(gemma_path))
    tensors = _sections(proc.stdout)["tensors"]
    assert proc.returncode == 0 and "(first 40; --tensors for all)" in tensors[0] and len(tensors) == 2 + 40
