"""What every block format shares: the format record, float16 fields, and ggml's float32 rounding helpers.

Bit-exactness with ggml (ggml/src/ggml-quants.c) rests on three rules followed throughout `pyquant.quants`:
every intermediate is float32 (numpy constants are wrapped in `np.float32`), expressions keep ggml's
evaluation order (`w*x*l` is `(w*x)*l`), and sums over a block run left to right (`seqsum`), never the
pairwise or SIMD order numpy's `sum` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

QK_K = 256  # values in a K-quant super-block
GROUP_MAX_EPS = np.float32(1e-15)  # below this max-abs a group counts as all zeros


@dataclass(frozen=True)
class BlockFormat:
    """One ggml block format: its names, sizes, and the block codecs (uint8 (n, type_size) <-> f32 (n, block_size))."""

    name: str  # lower-case ggml spelling, "q4_k"
    ggml_type: GGMLQuantizationType
    block_size: int  # values per block
    type_size: int  # bytes per block
    layout: str  # the byte map, fields in order: "d:2 dmin:2 scales:12 qs:128"
    quantize_blocks: Callable[[np.ndarray], np.ndarray]
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]

    def __post_init__(self):
        if sum(size for _, size in self.fields().values()) != self.type_size:
            raise ValueError(f"{self.name}: layout {self.layout!r} does not add up to {self.type_size} bytes")

    def fields(self) -> dict[str, tuple[int, int]]:
        """Field name -> (byte offset, byte size) within a block, from `layout`."""
        out, offset = {}, 0
        for item in self.layout.split():
            name, size = item.split(":")
            out[name] = (offset, int(size))
            offset += int(size)
        return out


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even via the 1.5 * 2**23 float trick, bit for bit (also out of range)."""
    bits = (np.asarray(x, dtype=np.float32) + np.float32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def seqsum(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Float32 sum over `axis` in C loop order (x[0] + x[1] + ...), as ggml's scalar loops add.

    An explicit loop, because numpy's own reductions may add pairwise. Fastest with `axis=0` on a
    values-major array (n, groups): each step is then one contiguous vector add.
    """
    a = np.moveaxis(np.asarray(a, dtype=np.float32), axis, 0)
    acc = a[0].copy()
    for row in a[1:]:
        acc += row
    return acc


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max |x| over the last axis and the signed value where it first occurs, as ggml's scan
    `amax = max = 0; if (fabsf(v) > amax) {...}` finds them: an all-zero row gives +0.0 even if it holds -0.0."""
    ax = np.abs(x)
    i = ax.argmax(axis=-1)[..., None]
    amax = np.take_along_axis(ax, i, axis=-1)[..., 0]
    return amax, np.where(amax > 0, np.take_along_axis(x, i, axis=-1)[..., 0], np.float32(0))


def first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max over the last axis, each the first value that attains it (so -0.0 vs 0.0 follows ggml's scan)."""
    lo = np.take_along_axis(x, x.argmin(axis=-1)[..., None], axis=-1)[..., 0]
    hi = np.take_along_axis(x, x.argmax(axis=-1)[..., None], axis=-1)[..., 0]
    return lo, hi


def f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 (n,) -> uint8 (n, 2): GGML_FP32_TO_FP16 (round to nearest even)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).reshape(-1, 1).view(np.uint8)


def f16_field(b: np.ndarray) -> np.ndarray:
    """uint8 (n, 2) -> float32 (n, 1): GGML_FP16_TO_FP32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def f16_round(x: np.ndarray) -> np.ndarray:
    """The float32 value a scale takes after a trip through its float16 field."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def unpack_bits(b: np.ndarray, shifts: tuple[int, ...], mask: int) -> np.ndarray:
    """uint8 (n, m) -> uint8 (n, len(shifts), m): field k of every byte is `(byte >> shifts[k]) & mask`."""
    s = np.array(shifts, dtype=np.uint8).reshape(1, -1, 1)
    return (b[:, None, :] >> s) & np.uint8(mask)


def pack_bits(q: np.ndarray, shifts: tuple[int, ...]) -> np.ndarray:
    """uint8 (n, len(shifts), m) -> uint8 (n, m): the inverse of `unpack_bits` for fields that fit their width."""
    out = np.zeros((q.shape[0], q.shape[2]), dtype=np.uint8)
    for k, s in enumerate(shifts):
        out |= q[:, k, :] << np.uint8(s)
    return out
