"""The weight formats the CPU kernels read, as data: a code per ggml type, its block geometry, and the
two places that map a code to its kernels: `dq16` (16 values into float registers) and `vdot` (a row's
integer dot product with int8 activations).

Kernels take the code as a compile-time constant (each public kernel passes its own), so these fold to a
single decoder and every kernel is specialized to one format.
"""

from __future__ import annotations

from dataclasses import dataclass

from numba import types
from numba.core.errors import TypingError
from numba.extending import overload

from . import quants_32, quants_k
from .jit import inline

F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = range(13)


@dataclass(frozen=True)
class Format:
    code: int
    block_values: int  # values per block (float rows: a block of 32)
    block_bytes: int

    @property
    def quantized(self) -> bool:  # takes int8 activations (vdot)
        return self.code in _VEC_DOTS


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
    F32: quants_32.dq16_f32,
    F16: quants_32.dq16_f16,
    BF16: quants_32.dq16_bf16,
    Q4_0: quants_32.dq16_q4_0,
    Q4_1: quants_32.dq16_q4_1,
    Q5_0: quants_32.dq16_q5_0,
    Q5_1: quants_32.dq16_q5_1,
    Q8_0: quants_32.dq16_q8_0,
    Q2_K: quants_k.dq16_q2_k,
    Q3_K: quants_k.dq16_q3_k,
    Q4_K: quants_k.dq16_q4_k,
    Q5_K: quants_k.dq16_q5_k,
    Q6_K: quants_k.dq16_q6_k,
}
_VEC_DOTS = {
    Q4_0: quants_32.vdot_q4_0,
    Q4_1: quants_32.vdot_q4_1,
    Q5_0: quants_32.vdot_q5_0,
    Q5_1: quants_32.vdot_q5_1,
    Q8_0: quants_32.vdot_q8_0,
    Q2_K: quants_k.vdot_q2_k,
    Q3_K: quants_k.vdot_q3_k,
    Q4_K: quants_k.vdot_q4_k,
    Q5_K: quants_k.vdot_q5_k,
    Q6_K: quants_k.vdot_q6_k,
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


def vdot(fmt, row0, row1, xq, xd, xs):
    """Two packed rows' dot products with one token's int8 activations (act_quant.quantize_act), float32."""
    raise NotImplementedError("vdot runs inside numba kernels only")


@overload(vdot, inline="always")
def _vdot(fmt, row0, row1, xq, xd, xs):
    if not isinstance(fmt, types.IntegerLiteral) or fmt.literal_value not in _VEC_DOTS:
        raise TypingError("vdot needs the code of a quantized format as a compile-time constant")
    kernel = _VEC_DOTS[fmt.literal_value]
    return lambda fmt, row0, row1, xq, xd, xs: kernel(row0, row1, xq, xd, xs)
