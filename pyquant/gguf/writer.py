"""GGUF writer: the gguf package's GGUFWriter, made atomic and streaming.

Tensors are declared first (name, type, shape) and their bytes produced one at a time by a callable, so a
converter holds one tensor in memory, not the model. Everything goes to a temp file beside the target, which
is renamed over it only once complete: a failed or interrupted write leaves any existing file untouched.
"""

from __future__ import annotations

import contextlib
import os
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
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class TensorSpec:
    name: str
    type: str  # lower-case ggml name
    shape: tuple[int, ...]  # numpy order
    produce: Callable[[], np.ndarray]  # returns the packed bytes (uint8) or a plain f32/f16 array


def _infer_type(value) -> tuple[GGUFValueType, GGUFValueType | None]:
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        return (GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.INT64), None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    if isinstance(value, np.ndarray):
        sub = {np.dtype(np.float32): GGUFValueType.FLOAT32, np.dtype(np.int32): GGUFValueType.INT32,
               np.dtype(np.uint32): GGUFValueType.UINT32, np.dtype(np.bool_): GGUFValueType.BOOL,
               np.dtype(np.int64): GGUFValueType.INT64, np.dtype(np.uint8): GGUFValueType.UINT8}
        if value.dtype not in sub:
            raise PyquantError(f"cannot store a numpy {value.dtype} array in GGUF metadata")
        return GGUFValueType.ARRAY, sub[value.dtype]
    if isinstance(value, (list, tuple)):
        return GGUFValueType.ARRAY, _infer_type(value[0])[0] if value else GGUFValueType.INT32
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
    with atomic_output(path) as tmp:
        w = GGUFWriter(tmp, metadata["general.architecture"])
        for key, value in metadata.items():
            if key in ("general.architecture", "GGUF.version"):
                continue
            vtype, sub = types.get(key) or _infer_type(value)
            if vtype == GGUFValueType.ARRAY:
                w.add_key_value(key, list(value) if not isinstance(value, np.ndarray) else value.tolist(), vtype, sub)
            else:
                w.add_key_value(key, value, vtype)
        for s in specs:
            qtype = GGMLQuantizationType[s.type.upper()]
            block, size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(s.shape))
            w.add_tensor_info(s.name, s.shape, np.dtype(np.uint8), n // block * size, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, s in enumerate(specs):
            data = np.ascontiguousarray(s.produce())
            qtype = GGMLQuantizationType[s.type.upper()]
            block, size = GGML_QUANT_SIZES[qtype]
            expected = int(np.prod(s.shape)) // block * size
            if data.nbytes != expected:
                raise PyquantError(f"tensor {s.name!r}: produced {data.nbytes} bytes, {s.type} {s.shape} needs {expected}")
            w.write_tensor_data(data.view(np.uint8).reshape(-1))
            if progress:
                progress(i + 1, len(specs), s.name)
        w.close()
    return Path(path)
