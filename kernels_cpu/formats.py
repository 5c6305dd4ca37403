"""The weight formats the CPU kernels read, as data: a code per ggml type, its block geometry, and `dq16`,
the one place that maps a code to its register decoder.

Kernels take the code as a compile-time constant (each public kernel passes its own), so `dq16` folds to a
single decoder and every kernel is specialized to one format.
"""

from __future__ import annotations

from dataclasses import dataclass

from numba import types
from numba.core.errors import TypingError
from numba.extending import overload

from .jit import inline
from .quants_32 import dq16_bf16, dq16_f16, dq16_f32, dq16_q4_0, dq16_q4_1, dq16_q5_0, dq16_q5_1, dq16_q8_0
from .quants_k import dq16_q2_k, dq16_q3_k, dq16_q4_k, dq16_q5_k, dq16_q6_k

F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = range(13)


@dataclass(frozen=True)
class Format:
    code: int
    block_values: int  # values per block (float rows: a block of 32)
    block_bytes: int


FORMATS = {
    "f32": Format(F32, 32, 128),
    "f16": Format(F16, 32, 64),
    "bf16": Format(BF16, 32, 64),
    "q4_0": Format(Q4_0, 32, 18),
    "q4_1": Format(Q4_1, 32, 20),
    "q5_0": Format(Q5_0, 32, 22),
    "q5_1": Format(Q5_1, 32, 24),
    "q8_0": Format(Q8_0, 32, 34),
    "q2_k": Format(Q2_K, 256, 84),
    "q3_k": Format(Q3_K, 256, 110),
    "q4_k": Format(Q4_K, 256, 144),
    "q5_k": Format(Q5_K, 256, 176),
    "q6_k": Format(Q6_K, 256, 210),
}


@inline
def block_values(fmt):
    return 256 if fmt >= Q2_K else 32


_DECODERS = {
    F32: dq16_f32,
    F16: dq16_f16,
    BF16: dq16_bf16,
    Q4_0: dq16_q4_0,
    Q4_1: dq16_q4_1,
    Q5_0: dq16_q5_0,
    Q5_1: dq16_q5_1,
    Q8_0: dq16_q8_0,
    Q2_K: dq16_q2_k,
    Q3_K: dq16_q3_k,
    Q4_K: dq16_q4_k,
    Q5_K: dq16_q5_k,
    Q6_K: dq16_q6_k,
}


def dq16(fmt, row, blk, g):
    """Values 16g..16g+15 of block blk of a packed row, float32x16 (fmt: a compile-time format code)."""
    raise NotImplementedError("dq16 runs inside numba kernels only")


@overload(dq16, inline="always")
def _dq16(fmt, row, blk, g):
    if not isinstance(fmt, types.IntegerLiteral):
        raise TypingError("dq16 needs the format code as a compile-time constant")
    decoder = _DECODERS[fmt.literal_value]
    return lambda fmt, row, blk, g: decoder(row, blk, g)
