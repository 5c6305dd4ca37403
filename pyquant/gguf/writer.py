"""GGUF writer: the gguf package's GGUFWriter, made atomic and streaming.

Tensors are declared first (name, type, shape) and their bytes produced one at a time by a callable, so a
converter holds one tensor in memory, not the model. Everything goes to a temp file beside the target, which
is renamed over it only once complete: a failed or interrupted write leaves any existing file untouched.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import PyquantError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename it onto `path` only if the block succeeds."""
    target = Path(path)
    if target.is_dir():
        raise PyquantError(f"{target}: is a directory")
    if not target.parent.exists():
        raise PyquantError(f"{target}: folder {target.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise PyquantError(f"{target}: cannot create a file in {target.parent}: {e.strerror}") from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the output gets the mode open() would give
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Writer(GGUFWriter):
    """GGUFWriter that also writes empty arrays (valid GGUF that llama.cpp reads; gguf-py refuses them) and
    packs numeric arrays with one numpy call after a range check (gguf-py packs item by item)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if vtype != GGUFValueType.ARRAY or sub_type is None:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = self._pack("I", vtype) if add_vtype else b""
        head += self._pack("I", sub_type) + self._pack("Q", len(val))
        return head + (_packed_array(val, sub_type) if len(val) else b"")


def _packed_array(values, sub: GGUFValueType) -> bytes:
    if sub == GGUFValueType.STRING:  # vocabularies: 100k+ strings, so no Python loop per string beyond encode
        encoded = [v.encode("utf-8") for v in values]
        lengths = np.fromiter(map(len, encoded), dtype="<i8", count=len(encoded))
        starts = 8 * np.arange(len(encoded)) + np.cumsum(lengths) - lengths  # where each length field goes
        out = np.empty(8 * len(encoded) + int(lengths.sum()), dtype=np.uint8)
        fields = starts[:, None] + np.arange(8)  # (n, 8) byte positions of the length fields
        chars = np.ones(len(out), dtype=bool)
        chars[fields] = False
        out[fields] = lengths.view(np.uint8).reshape(-1, 8)
        out[chars] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return out.tobytes()
    dtype = next((d for d, t in _NUMPY_TYPES.items() if t == sub), None)
    if dtype is None:
        raise ValueError(f"arrays of {sub.name} are not supported")
    if dtype.kind in "iu":
        lo, hi, info = min(values), max(values), np.iinfo(dtype)
        if lo < info.min or hi > info.max:
            raise ValueError(f"value {lo if lo < info.min else hi} does not fit in {sub.name}")
    return np.asarray(values, dtype=dtype.newbyteorder("<")).tobytes()


@dataclass
class TensorSpec:
    name: str
    type: str  # lower-case ggml name
    shape: tuple[int, ...]  # numpy order
    produce: Callable[[], np.ndarray]  # returns the packed bytes (uint8) or a plain f32/f16 array


_NUMPY_TYPES = {
    np.dtype(np.uint8): GGUFValueType.UINT8,
    np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16,
    np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32,
    np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.uint64): GGUFValueType.UINT64,
    np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float32): GGUFValueType.FLOAT32,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
    np.dtype(np.bool_): GGUFValueType.BOOL,
}


def _int_type(values) -> GGUFValueType:
    lo, hi = min(values), max(values)
    if 0 <= lo and hi < 2**32:
        return GGUFValueType.UINT32
    if -(2**31) <= lo and hi < 2**31:
        return GGUFValueType.INT32
    if -(2**63) <= lo and hi < 2**63:
        return GGUFValueType.INT64
    raise PyquantError(f"integer {lo if lo < -(2**63) else hi} does not fit in GGUF metadata")


def _infer_type(value) -> tuple[GGUFValueType, GGUFValueType | None]:
    """GGUF (value type, element type) for a Python or numpy value; ints get the smallest of u32/i32/i64."""
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL, None
    if isinstance(value, (np.generic, np.ndarray)) and value.dtype not in _NUMPY_TYPES:
        raise PyquantError(f"cannot store a numpy {value.dtype} value in GGUF metadata")
    if isinstance(value, np.ndarray):
        return GGUFValueType.ARRAY, _NUMPY_TYPES[value.dtype]
    if isinstance(value, np.generic):
        return _NUMPY_TYPES[value.dtype], None
    if isinstance(value, int):
        return _int_type([value]), None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    if isinstance(value, (list, tuple)):
        kinds = {type(v) for v in value}
        if not value:
            return GGUFValueType.ARRAY, GGUFValueType.INT32
        if kinds == {int}:
            return GGUFValueType.ARRAY, _int_type(value)
        elem = {_infer_type(v) for v in value}
        if len(elem) != 1 or next(iter(elem))[0] == GGUFValueType.ARRAY:
            found = sorted(t.__name__ for t in kinds)
            raise PyquantError(f"a GGUF metadata array holds one scalar type, not {found}")
        return GGUFValueType.ARRAY, next(iter(elem))[0]
    raise PyquantError(f"cannot store a {type(value).__name__} in GGUF metadata")


def write_gguf(
    path: str | os.PathLike,
    metadata: dict,
    tensors: Iterable[TensorSpec],
    types: dict | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write a GGUF file atomically. `metadata` must hold general.architecture; `types` maps keys to
    (value type, element type) where inference from the Python value would be wrong (e.g. an int32 key)."""
    types = types or {}
    if "general.architecture" not in metadata:
        raise PyquantError("GGUF metadata needs general.architecture")
    specs = list(tensors)
    layouts = [_layout(s) for s in specs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PyquantError(f"duplicate tensor name {dup!r}")
    with atomic_output(path) as tmp:
        w = _Writer(tmp, metadata["general.architecture"])
        try:
            for key, value in metadata.items():
                if key in ("general.architecture", "GGUF.version"):
                    continue
                vtype, sub = types.get(key) or _infer_type(value)
                if key == "general.alignment":  # the padding must follow the key, not the writer's default
                    if vtype != GGUFValueType.UINT32 or value <= 0 or value & (value - 1):
                        raise PyquantError(f"general.alignment {value!r} must be a uint32 power of two")
                    w.data_alignment = int(value)
                if vtype == GGUFValueType.ARRAY:
                    value = value.tolist() if isinstance(value, np.ndarray) else list(value)
                try:  # pack once here, so a value that does not fit its type names its key
                    w._pack_val(value, vtype, True, sub)
                except (ValueError, TypeError, OverflowError, AttributeError, struct.error) as e:
                    raise PyquantError(f"metadata {key!r}: cannot store {vtype.name} value: {e}") from None
                w.add_key_value(key, value, vtype, sub)
            for s, (qtype, byte_shape, nbytes) in zip(specs, layouts):
                # a uint8 tensor with raw_dtype: gguf reads the shape as bytes per row and converts it back
                w.add_tensor_info(s.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for i, (s, (_, _, expected)) in enumerate(zip(specs, layouts)):
                data = np.ascontiguousarray(s.produce())
                if data.nbytes != expected:
                    need = f"{s.type} {s.shape} needs {expected}"
                    raise PyquantError(f"tensor {s.name!r}: produced {data.nbytes} bytes, {need}")
                w.write_tensor_data(data.view(np.uint8).reshape(-1))
                if progress:
                    progress(i + 1, len(specs), s.name)
        finally:
            w.close()
    return Path(path)


def _layout(s: TensorSpec) -> tuple[GGMLQuantizationType, tuple[int, ...], int]:
    """(ggml type, shape in bytes per row, total bytes) of a spec, checked before anything is written."""
    try:
        qtype = GGMLQuantizationType[s.type.upper()]
        block, size = GGML_QUANT_SIZES[qtype]
    except KeyError:
        raise PyquantError(f"tensor {s.name!r}: unknown ggml type {s.type!r}") from None
    shape = tuple(int(d) for d in s.shape)
    if not 1 <= len(shape) <= 4 or min(shape) < 1:
        raise PyquantError(f"tensor {s.name!r}: shape {shape} needs 1 to 4 positive dimensions")
    if shape[-1] % block:
        raise PyquantError(
            f"tensor {s.name!r}: row length {shape[-1]} is not a multiple of {s.type} block size {block}"
        )
    byte_shape = (*shape[:-1], shape[-1] // block * size)
    return qtype, byte_shape, int(np.prod(byte_shape, dtype=np.int64))
