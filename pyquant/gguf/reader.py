"""GGUF reader: memory-mapped, zero copy, and strict about every byte it trusts.

Container layout (ggml's docs/gguf.md, versions 2 and 3, little endian):
    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64 | kv pairs | tensor infos | pad to alignment | data
    kv:      key (u64 len + utf-8) | value type u32 | value (arrays: elem type u32 | count u64 | elems)
    tensor:  name | n_dims u32 | dims u64[n_dims] (fastest first) | ggml type u32 | offset u64 (from data start)

gguf-py's GGUFReader trusts lengths and counts from the file; a hostile header can make it loop for hours or
read past the end. This reader checks every length, count, dimension, type and offset against the file
before it touches the bytes, and each failure is a GGUFError that names the file, the offset and the problem.
The type tables (value types, block sizes) come from the gguf package.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: llama.cpp rejects tensor names of 64 bytes or more
MAX_ELEMENTS = 1 << 62  # beyond this an element count cannot describe a real tensor
DEFAULT_ALIGNMENT = 32

_SCALARS = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_STRUCT_CODES = {("u", 1): "B", ("i", 1): "b", ("u", 2): "H", ("i", 2): "h", ("u", 4): "I", ("i", 4): "i",
                 ("f", 4): "f", ("u", 8): "Q", ("i", 8): "q", ("f", 8): "d"}
_TYPE_NAMES = {t.value: t.name.lower() for t in GGMLQuantizationType}
# numpy views for the unquantized types; block types are exposed as (rows, row_bytes) uint8
_PLAIN_DTYPES = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "f64": np.dtype("<f8"),
    "i8": np.dtype("i1"),
    "i16": np.dtype("<i2"),
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
    "bf16": np.dtype("<u2"),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # lower-case ggml name: "f32", "q4_k", ...
    shape: tuple[int, ...]  # numpy order: rows first (GGUF stores dims fastest first)
    offset: int  # absolute offset in the file
    nbytes: int
    data: np.ndarray  # uint8 view of the packed bytes (memory-mapped, read-only)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def array(self) -> np.ndarray:
        """Typed zero-copy view: float32/float16/... arrays of `shape`, or (rows, row_bytes) uint8 for blocks."""
        dtype = _PLAIN_DTYPES.get(self.type)
        if dtype is not None:
            return self.data.view(dtype).reshape(self.shape)
        rows = self.n_elements // self.shape[-1] if self.shape else 1
        return self.data.reshape(rows, self.nbytes // rows)


def _q(name: str) -> str:
    """A key or name as messages show it: quoted with escapes (one line, whatever bytes it holds), cut short."""
    return repr(name) if len(name) <= 80 else repr(name[:80]) + "..."


class _Cursor:
    """Bounds-checked little-endian reads from the mapped header (struct on the mmap: fast for the
    hundreds of thousands of vocabulary strings a header can hold)."""

    def __init__(self, mm: mmap.mmap, path: str):
        self.mm, self.path, self.pos, self.size = mm, path, 0, len(mm)

    def fail(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: {what} (at offset {self.pos if at is None else at})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated file: {what} needs {n} bytes, {self.size - self.pos} left")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.mm[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, dtype: np.dtype, what: str):
        self.need(dtype.itemsize, what)
        v = struct.unpack_from("<" + _STRUCT_CODES[dtype.kind, dtype.itemsize], self.mm, self.pos)[0]
        self.pos += dtype.itemsize
        return v

    def u32(self, what: str) -> int:
        return self.scalar(_SCALARS[GGUFValueType.UINT32], what)

    def u64(self, what: str) -> int:
        return self.scalar(_SCALARS[GGUFValueType.UINT64], what)

    def string(self, what: str) -> str:
        start = self.pos
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            left = self.size - self.pos
            raise self.fail(f"bad string length {n} for {what}: {left} bytes left (truncated file?)", start)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8", start) from None

    def _strings(self, count: int, key: str) -> list[str]:
        # the hot loop of a header (vocabularies, merges): inlined checks, one slice per string
        mm, pos, size, out = self.mm, self.pos, self.size, []
        unpack = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"truncated file: element {i} of {key}")
            n = unpack(mm, pos)[0]
            pos += 8
            if n > size - pos:
                left = size - pos
                msg = f"bad string length {n} for element {i} of {key}: {left} bytes left (truncated file?)"
                raise self.fail(msg, pos - 8)
            try:
                out.append(mm[pos : pos + n].decode("utf-8"))
            except UnicodeDecodeError:
                raise self.fail(f"element {i} of {key} is not valid UTF-8", pos - 8) from None
            pos += n
        self.pos = pos
        return out

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        raw = self.u32(f"value type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"unknown value type {raw} for {what}", at) from None

    def value(self, vtype: GGUFValueType, key: str):
        key = _q(key)
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype], f"value of {key}")
            return bool(v) if vtype == GGUFValueType.BOOL else v
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key}")
        # array
        etype = self.value_type(f"array elements of {key}")
        at = self.pos
        count = self.u64(f"array length of {key}")
        left = self.size - self.pos
        if etype == GGUFValueType.ARRAY:
            raise self.fail(f"nested arrays are not supported (key {key})", at)
        if etype == GGUFValueType.STRING:
            if count > left // 8:  # every string needs at least its 8-byte length
                raise self.fail(f"array length {count} of {key} exceeds the file (truncated file?)", at)
            return self._strings(count, key)
        dtype = _SCALARS[etype]
        if count > left // dtype.itemsize:
            raise self.fail(f"array length {count} of {key} exceeds the file (truncated file?)", at)
        arr = np.frombuffer(self.mm, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return arr.astype(bool) if etype == GGUFValueType.BOOL else arr


class GGUFFile:
    """A GGUF file, memory-mapped. `metadata` maps keys to Python values (numeric arrays as numpy arrays),
    `metadata_types` keeps each key's GGUF value type (and element type for arrays) for faithful rewriting,
    `tensors` maps GGUF tensor names to TensorInfo in file order."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):  # opening a fifo would block
                raise GGUFError(f"{self.path}: not a regular file")
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < 24:
                    raise GGUFError(f"{self.path}: truncated file: {size} bytes, less than a GGUF header")
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                self.buf = np.memmap(fh, dtype=np.uint8, mode="r", shape=(size,))
        except (OSError, ValueError) as e:  # a folder, a device, a file that cannot be mapped
            raise GGUFError(f"{self.path}: cannot open: {getattr(e, 'strerror', None) or e}") from None
        try:
            self._parse(_Cursor(mm, self.path), size)
        finally:
            mm.close()

    def _parse(self, cur: _Cursor, size: int) -> None:
        if cur.take(4, "magic") != GGUF_MAGIC:
            raise cur.fail("not a GGUF file (bad magic)", 0)
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            raise cur.fail(f"unsupported GGUF version {self.version} (supported: 2, 3)", 4)
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # a kv pair needs >= 8+4+1 bytes, a tensor info >= 8+4+8+4+8: absurd counts fail before any loop
        if n_kv > size // 13:
            raise cur.fail(f"metadata count {n_kv} cannot fit in a {size}-byte file (truncated file?)", 16)
        if n_tensors > size // 32:
            raise cur.fail(f"tensor count {n_tensors} cannot fit in a {size}-byte file (truncated file?)", 8)
        self.metadata: dict = {}
        self.metadata_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        for _ in range(n_kv):
            at = cur.pos
            key = cur.string("metadata key")
            if key in self.metadata:
                raise cur.fail(f"duplicate metadata key {_q(key)}", at)
            vtype = cur.value_type(_q(key))
            sub = None
            if vtype == GGUFValueType.ARRAY:
                sub_at = cur.pos
                sub = cur.value_type(_q(key))
                cur.pos = sub_at
            self.metadata[key] = cur.value(vtype, key)
            self.metadata_types[key] = (vtype, sub)

        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if self.metadata_types.get("general.alignment", (GGUFValueType.UINT32,))[0] != GGUFValueType.UINT32:
            raise GGUFError(f"{self.path}: general.alignment must be a uint32")
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment {self.alignment} is not a power of two")

        infos = []
        for _ in range(n_tensors):
            infos.append(self._tensor_info(cur))
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        if self.data_offset > size and infos:  # llama.cpp accepts a tensor-less file that ends unpadded
            raise GGUFError(f"{self.path}: truncated file: tensor data would start at {self.data_offset}, past the end")
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, ttype, shape, rel, nbytes, at in infos:
            if rel % self.alignment:
                raise GGUFError(f"{self.path}: tensor {name!r} offset {rel} is not aligned to {self.alignment}")
            start = self.data_offset + rel
            if start + nbytes > size:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} data [{start}, {start + nbytes}) runs past the end of the "
                    f"{size}-byte file (truncated?)"
                )
            if name in self.tensors:
                raise GGUFError(f"{self.path}: duplicate tensor name {name!r} (tensor info at offset {at})")
            spans.append((start, start + nbytes, name))
            self.tensors[name] = TensorInfo(name, ttype, shape, start, nbytes, self.buf[start : start + nbytes])
        spans.sort()
        for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise GGUFError(f"{self.path}: tensors {n0!r} and {n1!r} overlap at offset {s1}")

    def _tensor_info(self, cur: _Cursor):
        at = cur.pos
        name = cur.string("tensor name")
        if len(name.encode()) >= MAX_NAME:
            n = len(name.encode())
            raise cur.fail(f"tensor name {name[:40]!r}... is {n} bytes (at most {MAX_NAME - 1})", at)
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)", at)
        dims = [cur.u64(f"dimension {i} of tensor {name!r}") for i in range(n_dims)]
        n = 1
        for d in dims:
            if d == 0 or d > MAX_ELEMENTS:
                raise cur.fail(f"tensor {name!r} has bad dimension {d}", at)
            n *= d
            if n > MAX_ELEMENTS:
                raise cur.fail(f"tensor {name!r} element count overflows ({' x '.join(map(str, dims))})", at)
        type_at = cur.pos
        type_id = cur.u32(f"type of tensor {name!r}")
        tname = _TYPE_NAMES.get(type_id)
        if tname is None or GGMLQuantizationType(type_id) not in GGML_QUANT_SIZES:
            raise cur.fail(f"tensor {name!r} has unknown ggml type id {type_id}", type_at)
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        if dims[0] % block:
            raise cur.fail(f"tensor {name!r} row length {dims[0]} is not a multiple of {tname} block size {block}", at)
        nbytes = n // block * type_size
        offset = cur.u64(f"data offset of tensor {name!r}")
        return name, tname, tuple(int(d) for d in reversed(dims)), offset, nbytes, at

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        """A metadata value the caller cannot work without; a missing key is a one-line error naming it."""
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}")
        return self.metadata[key]

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        return self.tensors[name]

    @property
    def architecture(self) -> str:
        return self.require("general.architecture")
