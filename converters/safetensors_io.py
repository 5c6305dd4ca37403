"""Checkpoint tensors, one at a time: safetensors (memory-mapped) and PyTorch .bin (torch.load mmap=True).

safetensors layout (huggingface/safetensors README): u64 little-endian header length N | N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} | data (offsets relative to
the end of the header). We parse the header ourselves and memory-map the data (pages dropped with
madvise once a tensor is copied out, so resident memory stays about one tensor), because numpy has no bfloat16
and safetensors' numpy backend refuses it: a bf16 tensor is read as uint16 and widened to float32 by a shift.
Each header entry is checked against the file size and its dtype x shape before a byte is mapped.

Sharded checkpoints are found through model.safetensors.index.json / pytorch_model.bin.index.json.
`TensorSource.load(name)` returns a float32 array; nothing else stays in memory.
"""

from __future__ import annotations

import json
import mmap
import pickle
import struct
from pathlib import Path

import numpy as np

from pyquant.errors import PyquantError

_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}
MAX_HEADER = 100 << 20  # the safetensors spec caps the header at 100 MB


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 (exact: bf16 is the top half of a float32), one allocation: the bits go
    into the high half of each little-endian float32, the low half stays zero."""
    out = np.zeros((*raw.shape, 2), dtype=np.uint16)
    out[..., 1] = raw
    return out.view(np.float32).reshape(raw.shape)


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PyquantError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise PyquantError(f"{path}: bad safetensors header length {n} (file has {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise PyquantError(f"{path}: safetensors header is not JSON: {e}") from None
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            if dtype not in _ST_DTYPES:
                raise PyquantError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            need = int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[dtype].itemsize
            if not 0 <= begin <= end or end - begin != need or self.data_start + end > size:
                raise PyquantError(
                    f"{path}: tensor {name!r} data [{begin}, {end}) does not fit {dtype} {shape} "
                    f"in a {size}-byte file"
                )
            self.entries[name] = (dtype, shape, begin, end)
        self._mm: mmap.mmap | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def load(self, name: str, rows: slice | None = None) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        start, stop = self.data_start + begin, self.data_start + end
        if rows is not None:  # a block of rows: one contiguous byte range
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            r0, r1, _ = rows.indices(shape[0])
            start, stop, shape = start + r0 * row_bytes, start + r1 * row_bytes, (r1 - r0, *shape[1:])
        item = _ST_DTYPES[dtype]
        raw = np.frombuffer(
            self._mm, dtype=item, count=(stop - start) // item.itemsize, offset=start
        ).reshape(shape)
        out = bf16_to_f32(raw) if dtype == "BF16" else raw.astype(np.float32)  # a copy either way
        del raw
        # the mapped pages were read once: drop them so resident memory stays about one tensor
        page = start - start % mmap.PAGESIZE
        if stop > start and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, page, stop - page)
        return out


class _TorchFile:
    def __init__(self, path: Path):
        import torch

        self.path = path
        try:
            self.state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
            raise PyquantError(f"{path}: cannot load PyTorch checkpoint: {e}") from None
        self.entries = {k: v for k, v in self.state.items() if hasattr(v, "shape")}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name].shape)

    def load(self, name: str, rows: slice | None = None) -> np.ndarray:
        import torch

        t = self.entries[name] if rows is None else self.entries[name][rows]
        return t.to(torch.float32).numpy().copy() if t.dtype == torch.float32 else t.to(torch.float32).numpy()


class TensorSource:
    """All tensors of a HF checkpoint folder by name, loaded lazily as float32 arrays."""

    def __init__(self, folder: Path):
        self.folder = folder
        files = self._find(folder)
        self.files = [(_SafetensorsFile if f.suffix == ".safetensors" else _TorchFile)(f) for f in files]
        self.where: dict[str, _SafetensorsFile | _TorchFile] = {}
        for f in self.files:
            for name in f.entries:
                self.where[name] = f

    @staticmethod
    def _find(folder: Path) -> list[Path]:
        for stem in ("model.safetensors", "pytorch_model.bin"):
            index = folder / f"{stem}.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map", {})
                parts = sorted(set(weight_map.values()))
                missing = [p for p in parts if not (folder / p).is_file()]
                if missing:
                    raise PyquantError(f"{folder}: {index.name} lists missing files: {', '.join(missing)}")
                return [folder / p for p in parts]
            if (folder / stem).is_file():
                return [folder / stem]
        shards = sorted(folder.glob("model-*.safetensors")) or sorted(folder.glob("pytorch_model-*.bin"))
        if shards:
            return shards
        raise PyquantError(f"{folder}: no model.safetensors or pytorch_model.bin")

    def names(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def load(self, name: str, rows: slice | None = None) -> np.ndarray:
        """float32 copy of a tensor, or of a block of its rows (first axis)."""
        if name not in self.where:
            raise PyquantError(f"{self.folder}: missing tensor {name!r}")
        return self.where[name].load(name, rows)

    @property
    def nbytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)
