"""ggml block formats in numpy: one module per format (ggml spelling), a registry, and the public codec API.

Every module holds its byte layout and a vectorized `quantize_blocks` (float32 (n, block_size) -> uint8
(n, type_size)) / `dequantize_blocks` pair whose bytes and floats match ggml's reference code
(ggml/src/ggml-quants.c) bit for bit; tests/test_quants.py checks them against the `gguf` package and
llama.cpp's own library. This package is the oracle the CPU and CUDA kernels are tested against.

    quantize(x, "q4_k")                  float32 (..., n) -> uint8 (..., row_bytes("q4_k", n)), GGUF bytes
    dequantize(packed, "q4_k", shape)    GGUF bytes -> float32 `shape` (numpy order, rows first)

A type is named by its lower-case ggml name ("q4_k"), its upper-case name, or its GGML type id / enum.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import PyquantError
from . import bf16, f16, f32, q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0, q8_k
from .common import BlockFormat

__all__ = [
    "FORMATS",
    "BlockFormat",
    "block_size",
    "dequantize",
    "get_format",
    "quantize",
    "row_bytes",
    "type_id",
    "type_name",
    "type_size",
]

_MODULES = (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, q8_k)
FORMATS: dict[str, BlockFormat] = {m.FORMAT.name: m.FORMAT for m in _MODULES}
_BY_ID: dict[int, BlockFormat] = {int(f.ggml_type): f for f in FORMATS.values()}

TypeLike = str | int | GGMLQuantizationType | BlockFormat

# Values handled per call of a block codec: big enough to amortize Python overhead, small enough that the
# K-quant searches' temporaries stay in cache and memory stays flat on large tensors.
_CHUNK_VALUES = 1 << 17


def _valid() -> str:
    return ", ".join(FORMATS)


def get_format(type: TypeLike) -> BlockFormat:
    """The BlockFormat for a name ("q4_k", "Q4_K"), a GGML type id or enum, or a BlockFormat."""
    if isinstance(type, BlockFormat):
        return type
    if isinstance(type, str):
        fmt = FORMATS.get(type.lower())
        if fmt is None:
            raise PyquantError(f"unknown quantization type {type!r}; valid types: {_valid()}")
        return fmt
    if isinstance(type, (int, np.integer)):
        fmt = _BY_ID.get(int(type))
        if fmt is None:
            try:
                label = f"{int(type)} ({GGMLQuantizationType(int(type)).name})"
            except ValueError:
                label = str(int(type))
            raise PyquantError(f"unsupported GGML type id {label}; valid types: {_valid()}")
        return fmt
    raise PyquantError(f"quantization type must be a name or a GGML type id, not {type!r}")


def block_size(type: TypeLike) -> int:
    """Values per block."""
    return get_format(type).block_size


def type_size(type: TypeLike) -> int:
    """Bytes per block."""
    return get_format(type).type_size


def row_bytes(type: TypeLike, n: int) -> int:
    """Bytes that a row of n values takes; n must be a multiple of the block size."""
    fmt = get_format(type)
    if n < 0 or n % fmt.block_size:
        raise PyquantError(f"{fmt.name}: row length {n} is not a multiple of the block size {fmt.block_size}")
    return n // fmt.block_size * fmt.type_size


def type_id(name: TypeLike) -> int:
    """The GGML type id (as stored in GGUF) of a type name."""
    return int(get_format(name).ggml_type)


def type_name(id: TypeLike) -> str:
    """The lower-case ggml name of a GGML type id."""
    return get_format(id).name


def quantize(x: np.ndarray, type: TypeLike) -> np.ndarray:
    """float32 (..., n) with n a multiple of the block size -> uint8 (..., row_bytes(type, n)), GGUF's bytes."""
    fmt = get_format(type)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise PyquantError(
            f"{fmt.name}: cannot quantize a scalar; pass an array whose last dim holds the rows"
        )
    out_shape = x.shape[:-1] + (row_bytes(fmt, x.shape[-1]),)
    blocks = np.ascontiguousarray(x).reshape(-1, fmt.block_size)
    out = np.empty((blocks.shape[0], fmt.type_size), dtype=np.uint8)
    step = max(1, _CHUNK_VALUES // fmt.block_size)
    with np.errstate(all="ignore"):  # overflow to inf and 0/0 on degenerate blocks behave as in ggml
        for i in range(0, blocks.shape[0], step):
            out[i : i + step] = fmt.quantize_blocks(blocks[i : i + step])
    return out.reshape(out_shape)


def dequantize(packed: np.ndarray, type: TypeLike, shape) -> np.ndarray:
    """GGUF bytes (any array or memmap; its bytes are read in order) -> float32 array of `shape`."""
    fmt = get_format(type)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if len(shape) == 0 or any(s < 0 for s in shape):
        raise PyquantError(f"{fmt.name}: bad tensor shape {shape}")
    n_bytes = math.prod(shape[:-1]) * row_bytes(fmt, shape[-1])
    raw = np.asarray(packed)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size != n_bytes:
        raise PyquantError(f"{fmt.name}: shape {shape} takes {n_bytes} bytes, but {raw.size} were given")
    blocks = raw.reshape(-1, fmt.type_size)
    out = np.empty((blocks.shape[0], fmt.block_size), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // fmt.block_size)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN in the file decode as ggml decodes them
        for i in range(0, blocks.shape[0], step):
            out[i : i + step] = fmt.dequantize_blocks(blocks[i : i + step])
    return out.reshape(shape)
