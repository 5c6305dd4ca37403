"""Fuzz the GGUF reader (and `pyquant inspect`'s rendering) with mutated real headers.

The corpus is built from the real models: a small realistic GGUF per model written with our writer (the
real metadata with the vocabulary cut to a few hundred entries, a general.alignment key, and a dozen tensors
with the real names and types but tiny shapes), plus the real full headers over a sparse copy of the data.
Each case applies one to three mutations (byte flips, u32/u64 overwrites at field positions with boundary
values, truncations, splices, insertions, deletions, cross-overs between corpus files), writes the file and
opens it with GGUFFile in-process. A case passes when it succeeds (then every tensor view and the inspect
table and JSON must render) or raises GGUFError; anything else, or a case slower than its limit, is a crash.

    python bench/fuzz_gguf.py --cases 100000 --seed 1 [--full-cases 200] [--show 5]

tests/test_gguf.py imports this module for its CI-sized run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import re
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pyquant.errors import GGUFError
from pyquant.gguf import GGUFFile, write_gguf
from pyquant.gguf.writer import TensorSpec

# ---------------------------------------------------------------- corpus

_VALUE_SIZES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}


@dataclass
class Layout:
    """Where each field of a well-formed GGUF header sits: what the mutators aim at, and what tests use
    to edit one field of a real header. Walked independently of the reader under test."""

    kv: dict[str, dict[str, int]] = field(default_factory=dict)  # key -> at, vtype_at, value_at (+ count_at)
    tensors: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> at, n_dims_at, dims_at, ...
    fields: list[tuple[int, int]] = field(default_factory=list)  # (position, width) of every integer field
    end: int = 0  # end of the tensor infos


def layout(buf: bytes, strings_per_array: int = 4) -> Layout:
    """Walk a well-formed header; record the first `strings_per_array` string lengths of each array."""
    out = Layout()
    u32 = struct.Struct("<I").unpack_from
    u64 = struct.Struct("<Q").unpack_from
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    out.fields += [(4, 4), (8, 8), (16, 8)]
    pos = 24
    for _ in range(n_kv):
        at = pos
        (n,) = u64(buf, pos)
        key = bytes(buf[pos + 8 : pos + 8 + n]).decode()
        out.fields.append((pos, 8))
        pos += 8 + n
        (vt,) = u32(buf, pos)
        entry = {"at": at, "vtype_at": pos, "value_at": pos + 4}
        out.fields.append((pos, 4))
        pos += 4
        if vt == GGUFValueType.STRING:
            out.fields.append((pos, 8))
            pos += 8 + u64(buf, pos)[0]
        elif vt == GGUFValueType.ARRAY:
            (et,) = u32(buf, pos)
            (count,) = u64(buf, pos + 4)
            entry["count_at"] = pos + 4
            out.fields += [(pos, 4), (pos + 4, 8)]
            pos += 12
            if et == GGUFValueType.STRING:
                for i in range(count):
                    if i < strings_per_array:
                        out.fields.append((pos, 8))
                    pos += 8 + u64(buf, pos)[0]
            else:
                pos += count * _VALUE_SIZES[GGUFValueType(et)]
        else:
            out.fields.append((pos, _VALUE_SIZES[GGUFValueType(vt)]))
            pos += _VALUE_SIZES[GGUFValueType(vt)]
        out.kv[key] = entry
    for _ in range(n_tensors):
        at = pos
        (n,) = u64(buf, pos)
        name = bytes(buf[pos + 8 : pos + 8 + n]).decode()
        out.fields.append((pos, 8))
        pos += 8 + n
        (n_dims,) = u32(buf, pos)
        entry = {"at": at, "n_dims_at": pos, "dims_at": pos + 4}
        out.fields.append((pos, 4))
        pos += 4
        out.fields += [(pos + 8 * i, 8) for i in range(n_dims)]
        pos += 8 * n_dims
        entry["type_at"], entry["offset_at"] = pos, pos + 4
        out.fields += [(pos, 4), (pos + 4, 8)]
        pos += 12
        out.tensors[name] = entry
    out.end = pos
    return out


def small_gguf(src: GGUFFile, path: Path, vocab: int = 300, n_tensors: int = 12, seed: int = 0) -> Path:
    """A few-KB GGUF that looks like `src`: its metadata (arrays cut to `vocab` items, general.alignment
    set), and its first tensors of each type with real names and tiny block-aligned shapes."""
    metadata, types = {}, dict(src.metadata_types)
    for key, value in src.metadata.items():
        metadata[key] = value[:vocab] if isinstance(value, (list, np.ndarray)) else value
    metadata["general.alignment"] = 32
    types["general.alignment"] = (GGUFValueType.UINT32, None)
    by_type: dict[str, list] = {}
    for t in src.tensors.values():
        by_type.setdefault(t.type, []).append(t)
    picked = []
    while len(picked) < n_tensors and any(by_type.values()):
        for group in by_type.values():
            if group and len(picked) < n_tensors:
                picked.append(group.pop(0))
    rng = np.random.default_rng(seed)
    specs = []
    for t in picked:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.type.upper()]]
        shape = (min(t.shape[0], 64),) if len(t.shape) == 1 else (2, block * (2 if block > 1 else 16))
        nbytes = int(np.prod(shape)) // block * size
        data = rng.integers(0, 256, nbytes, dtype=np.uint8)
        specs.append(TensorSpec(t.name, t.type, shape, lambda d=data: d))
    return write_gguf(path, metadata, specs, types=types)


@dataclass
class Seed:
    """A corpus entry: the bytes we mutate, the size the file is extended to (sparsely) when the mutation
    keeps the length (a real header is followed by hundreds of MB of data we do not copy), and its fields."""

    name: str
    head: bytes
    size: int
    fields: list[tuple[int, int]]


def real_header_seed(path: Path) -> Seed:
    f = GGUFFile(path)
    with open(path, "rb") as fh:
        head = fh.read(f.data_offset)
    return Seed(Path(path).stem, head, len(f.buf), layout(head).fields)


def file_seed(path: Path) -> Seed:
    head = Path(path).read_bytes()
    return Seed(Path(path).stem, head, len(head), layout(head).fields)


# ---------------------------------------------------------------- mutators

_BOUNDARY = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    9,
    13,
    31,
    32,
    33,
    63,
    64,
    255,
    256,
    1 << 15,
    1 << 16,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
]


def _value(rng: random.Random, old: int, size: int, pos: int) -> int:
    choice = rng.randrange(6)
    if choice == 0:
        return rng.choice(_BOUNDARY)
    if choice == 1:
        return old + rng.choice([-2, -1, 1, 2, 32, -32])
    if choice == 2:
        return rng.choice([size, size - pos, size - pos - 8, size + 1, old * 2, old // 2])
    if choice == 3:
        return rng.getrandbits(rng.choice([8, 16, 32, 64]))
    if choice == 4:
        return rng.randrange(14)  # a plausible value-type or small ggml-type id
    return rng.randrange(40)  # around the ggml type ids


def m_field(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    pos, width = rng.choice(seed.fields)
    if pos + width > len(buf):
        return m_flip(buf, seed, rng)
    fmt = "<Q" if width == 8 else "<I" if width == 4 else "<H" if width == 2 else "<B"
    old = struct.unpack_from(fmt, buf, pos)[0]
    new = _value(rng, old, seed.size, pos) % (1 << (8 * width))
    struct.pack_into(fmt, buf, pos, new)
    return f"field{8 * width}"


def m_flip(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.6 and seed.fields:  # near a field, where a flip changes structure
            pos = min(len(buf) - 1, rng.choice(seed.fields)[0] + rng.randrange(8))
        else:
            pos = rng.randrange(len(buf))
        buf[pos] ^= rng.randint(1, 255)
    return "flip"


def m_truncate(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    cut = rng.choice(seed.fields)[0] + rng.randrange(9) if rng.random() < 0.5 else rng.randrange(len(buf))
    del buf[min(cut, len(buf) - 1) :]
    return "truncate"


def m_splice(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    n = rng.randint(1, 64)
    a, b = rng.randrange(len(buf)), rng.randrange(len(buf))
    chunk = buf[a : a + n]
    kind = rng.randrange(3)
    if kind == 0:
        buf[b : b + len(chunk)] = chunk
        return "splice"
    if kind == 1:
        buf[b:b] = chunk
        return "insert"
    del buf[b : b + n]
    return "delete"


MUTATORS = [m_field, m_field, m_field, m_flip, m_flip, m_truncate, m_splice]


def mutate(seed: Seed, corpus: list[Seed], rng: random.Random) -> tuple[str, bytes, int]:
    """One case: (kinds applied, bytes, size to extend the file to)."""
    buf = bytearray(seed.head)
    kinds = []
    if len(corpus) > 1 and rng.random() < 0.05:  # cross-over: the head of one file, the tail of another
        other = rng.choice(corpus).head
        cut = rng.randrange(min(len(buf), len(other)))
        buf[cut:] = other[cut:]
        kinds.append("cross")
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if len(buf) < 2:
            break
        kinds.append(rng.choice(MUTATORS)(buf, seed, rng))
    truncated = len(buf) < len(seed.head) and "truncate" in kinds
    size = len(buf) if truncated else seed.size + len(buf) - len(seed.head)
    return "+".join(kinds), bytes(buf), size


# ---------------------------------------------------------------- running


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise CaseTimeout in the main thread after `seconds` (a reader stuck in a loop shows as a crash)."""

    def on_alarm(signum, frame):
        raise CaseTimeout(f"case ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Result:
    seed: str
    kinds: str
    outcome: str  # "ok", "error" (a GGUFError) or "crash"
    message: str
    seconds: float
    path: Path | None = None


def check_opened(f: GGUFFile) -> None:
    """What a successful open promises: every tensor inside the file, aligned, its views usable, and the
    inspect table and JSON render."""
    from pyquant import inspect as inspect_cmd

    size = len(f.buf)
    for t in f.tensors.values():
        assert f.data_offset <= t.offset and t.offset + t.nbytes <= size, t.name
        assert (t.offset - f.data_offset) % f.alignment == 0, t.name
        assert t.data.nbytes == t.nbytes and np.shares_memory(t.data, f.buf), t.name
        a = t.array()
        assert a.nbytes == t.nbytes, t.name
        int(t.data[0]) + int(t.data[-1])  # touch the first and last byte: a bad mapping would fault here
    with contextlib.redirect_stdout(io.StringIO()):
        inspect_cmd.run(argparse.Namespace(file=f.path, json=False, tensors=True))
    json.dumps(inspect_cmd.describe(f.path), allow_nan=False)  # strict JSON, whatever floats the file holds


def run_case(path: Path, limit: float) -> tuple[str, str]:
    """Open `path`; ("ok", "") or ("error", message) or ("crash", traceback)."""
    try:
        with deadline(limit):
            f = GGUFFile(path)
            check_opened(f)
        del f
        return "ok", ""
    except GGUFError as e:
        return "error", str(e)
    except Exception:  # noqa: BLE001 - any other exception is a reader bug: keep the whole trace
        return "crash", traceback.format_exc()


def fuzz(
    corpus: list[Seed], cases: int, seed: int, workdir: Path, limit: float = 2.0, keep_crashes: bool = True
) -> list[Result]:
    """Run `cases` mutated files round-robin over the corpus."""
    rng = random.Random(seed)
    results = []
    for i in range(cases):
        s = corpus[i % len(corpus)]
        kinds, data, size = mutate(s, corpus, rng)
        path = workdir / f"case{i:07d}.gguf"
        with open(path, "wb") as fh:
            fh.write(data)
            if size > len(data):
                fh.truncate(size)  # sparse: the data region of a real header costs no disk
        t0 = time.perf_counter()
        outcome, message = run_case(path, limit)
        elapsed = time.perf_counter() - t0
        keep = outcome == "crash" and keep_crashes
        if not keep:
            path.unlink()
        results.append(Result(s.name, kinds, outcome, message, elapsed, path if keep else None))
    return results


# ---------------------------------------------------------------- reporting

_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_NUMBER = re.compile(r"\d+")


def message_kind(message: str) -> str:
    """The shape of an error message: file path, names and numbers taken out."""
    text = message.split(": ", 1)[1] if ": " in message else message
    text = re.sub(r" \(at offset \d+\)$", "", text)
    text = _QUOTED.sub("'…'", text)
    text = re.sub(r"'…'(\.\.\.)?", "'…'", text)
    return _NUMBER.sub("N", text)


def summary(results: list[Result]) -> str:
    outcomes = Counter(r.outcome for r in results)
    kinds = Counter(message_kind(r.message) if r.outcome == "error" else r.outcome for r in results)
    slow = max(results, key=lambda r: r.seconds)
    total = sum(r.seconds for r in results)
    mean = 1e3 * total / len(results)
    head = (
        f"{len(results)} cases: {outcomes['ok']} opened, {outcomes['error']} GGUFError, "
        f"{outcomes['crash']} crashes; {total:.1f} s in the reader, mean {mean:.2f} ms, "
        f"slowest {1e3 * slow.seconds:.0f} ms ({slow.seed}, {slow.kinds})"
    )
    lines = [
        head,
        "",
        f"{'cases':>7}  outcome / error message kind",
    ]
    lines += [f"{n:>7}  {kind}" for kind, n in kinds.most_common()]
    by_mutation = Counter()
    for r in results:
        for k in r.kinds.split("+"):
            by_mutation[k, r.outcome] += 1
    lines += ["", f"{'mutation':<10} {'ok':>7} {'error':>7} {'crash':>7}"]
    for k in sorted({k for k, _ in by_mutation}):
        lines.append(
            f"{k:<10} {by_mutation[k, 'ok']:>7} {by_mutation[k, 'error']:>7} {by_mutation[k, 'crash']:>7}"
        )
    return "\n".join(lines)


def build_corpus(workdir: Path, models=("qwen", "gemma"), full: bool = True) -> tuple[list[Seed], list[Seed]]:
    """(small realistic seeds, full real-header seeds) from the real models."""
    from pyquant.models import model_path

    small, full_seeds = [], []
    for name in models:
        path = model_path(name)
        small.append(file_seed(small_gguf(GGUFFile(path), workdir / f"small-{name}.gguf")))
        if full:
            full_seeds.append(real_header_seed(path))
    return small, full_seeds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=20000, help="cases over the small realistic headers")
    p.add_argument("--full-cases", type=int, default=100, help="cases over the real full headers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--limit", type=float, default=5.0, help="seconds a case may take before it counts as a crash"
    )
    p.add_argument("--show", type=int, default=3, help="crash traces to print")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz-gguf-") as tmp:
        work = Path(tmp)
        small, full = build_corpus(work, full=args.full_cases > 0)
        results = fuzz(small, args.cases, args.seed, work, args.limit, keep_crashes=False)
        if args.full_cases:
            results += fuzz(full, args.full_cases, args.seed + 1, work, args.limit, keep_crashes=False)
    print(summary(results))
    crashes = [r for r in results if r.outcome == "crash"]
    for r in crashes[: args.show]:
        print(f"\n--- crash ({r.seed}, {r.kinds}, {r.seconds:.2f} s)\n{r.message}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
