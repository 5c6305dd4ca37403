"""Registers for integer dot products: 32 bytes (`b32`), 8 int32 lanes (`i32x8`), 8 float32 lanes (`f32x8`).

The quantized matvec kernels follow llama.cpp's vec_dot: weight codes are made unsigned bytes (0..2^bits-1,
or int8 + 128), activations are int8 blocks of 32 with a float scale, and `idot` adds the four u8 x i8
products of each 4-byte group into an int32 lane (x86 VPDPBUSD where the CPU has AVX512-VNNI, else the
same sum in generic LLVM IR). A weight's offset (q - 8, q - 16, w + 128 ...) comes back out as
offset * sum(activation codes), from the per-16 sums the activation quantizer keeps.

`idot` needs no saturation care: VPDPBUSD adds in 32 bits, and so does the generic form.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

from .simd import _intrinsic_fn, _ptr

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_VB = ir.VectorType(_I8, 32)
_VI = ir.VectorType(_I32, 8)
_VF = ir.VectorType(_F32, 8)
_FAST = ("fast",)

_features = llvm.get_host_cpu_features()
HAS_VNNI = bool(_features.get("avx512vnni") and _features.get("avx512vl"))


class B32Type(types.Type):
    def __init__(self):
        super().__init__(name="b32")


class I32x8Type(types.Type):
    def __init__(self):
        super().__init__(name="i32x8")


class F32x8Type(types.Type):
    def __init__(self):
        super().__init__(name="f32x8")


b32, i32x8, f32x8 = B32Type(), I32x8Type(), F32x8Type()


def _model(vty):
    class Model(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            super().__init__(dmm, fe_type, vty)

    return Model


register_model(B32Type)(_model(_VB))
register_model(I32x8Type)(_model(_VI))
register_model(F32x8Type)(_model(_VF))


def _c(vty, value):
    return ir.Constant(vty, [value] * vty.count)


def _byte(context, builder, val, ty):
    return context.cast(builder, val, ty, types.uint8)


def _splat(builder, scalar, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


# --- bytes ----------------------------------------------------------------------------------------------------
@intrinsic
def bload(typingctx, arr, idx):
    """32 bytes arr[idx:idx+32]."""

    def cg(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _VB), align=1)

    return b32(arr, idx), cg


@intrinsic
def bnib(typingctx, arr, idx):
    """16 bytes arr[idx:idx+16] -> 32 nibbles: lanes 0-15 the low nibbles, lanes 16-31 the high ones."""

    def cg(context, builder, sig, args):
        v16 = ir.VectorType(_I8, 16)
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], v16), align=1)
        lo = builder.and_(v, _c(v16, 15))
        hi = builder.lshr(v, _c(v16, 4))
        return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))

    return b32(arr, idx), cg


@intrinsic
def bbits(typingctx, arr, idx, val):
    """Lane j = val where bit j of the little-endian uint32 at arr[idx] is set, else 0 (val a constant)."""
    if not isinstance(val, types.IntegerLiteral):
        return None

    def cg(context, builder, sig, args):
        bits = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _I32), align=1)
        on = builder.bitcast(
            bits, ir.VectorType(ir.IntType(1), 32)
        )  # AVX-512: a mask register, then one move
        return builder.select(on, _c(_VB, sig.args[2].literal_value), _c(_VB, 0))

    return b32(arr, idx, val), cg


def _binary_b(op):
    @intrinsic
    def impl(typingctx, a, b):
        """Lane-wise on bytes; b is a b32 or a scalar applied to every lane."""

        def cg(context, builder, sig, args):
            rhs = args[1]
            if not isinstance(sig.args[1], B32Type):
                rhs = _splat(builder, _byte(context, builder, rhs, sig.args[1]), _VB)
            return getattr(builder, op)(args[0], rhs)

        return b32(a, b), cg

    return impl


band = _binary_b("and_")
bor = _binary_b("or_")
bxor = _binary_b("xor")


def _shift_words(builder, v, count, context, ty, op):
    """Shift the 8 int32 words of a b32 by one count (one instruction even when count varies)."""
    n = builder.trunc(context.cast(builder, count, ty, types.int64), _I32)
    words = getattr(builder, op)(builder.bitcast(v, _VI), _splat(builder, n, _VI))
    return builder.bitcast(words, _VB)


@intrinsic
def bfield(typingctx, v, shift, mask):
    """(byte >> shift) & mask in every lane, for fields that stay inside their byte (shift + width <= 8)."""

    def cg(context, builder, sig, args):
        moved = _shift_words(builder, args[0], args[1], context, sig.args[1], "lshr")
        return builder.and_(moved, _splat(builder, _byte(context, builder, args[2], sig.args[2]), _VB))

    return b32(v, shift, mask), cg


@intrinsic
def bshl(typingctx, v, shift):
    """byte << shift in every lane, for values below 2**(8 - shift) (nothing crosses into the next byte)."""

    def cg(context, builder, sig, args):
        return _shift_words(builder, args[0], args[1], context, sig.args[1], "shl")

    return b32(v, shift), cg


# --- int32 x 8 and the dot product ----------------------------------------------------------------------------
@intrinsic
def izero8(typingctx):
    return i32x8(), lambda context, builder, sig, args: _c(_VI, 0)


@intrinsic
def idot(typingctx, acc, a, b):
    """acc + per lane i: sum_k u8(a[4i+k]) * i8(b[4i+k])."""

    def cg(context, builder, sig, args):
        acc, a, b = args
        if HAS_VNNI:
            fn = _intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.256", _VI, [_VI, _VI, _VI])
            return builder.call(fn, [acc, builder.bitcast(a, _VI), builder.bitcast(b, _VI)])
        v32 = ir.VectorType(_I32, 32)
        prod = builder.mul(builder.zext(a, v32), builder.sext(b, v32))
        for k in range(4):
            part = builder.shuffle_vector(
                prod, prod, ir.Constant(ir.VectorType(_I32, 8), [4 * i + k for i in range(8)])
            )
            acc = builder.add(acc, part)
        return acc

    return i32x8(acc, a, b), cg


@intrinsic
def isum8(typingctx, a):
    """The sum of the 8 int32 lanes (int32)."""

    def cg(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "llvm.vector.reduce.add.v8i32", _I32, [_VI])
        return builder.call(fn, [args[0]])

    return types.int32(a), cg


# --- float32 x 8 --------------------------------------------------------------------------------------------------
@intrinsic
def f8zero(typingctx):
    return f32x8(), lambda context, builder, sig, args: _c(_VF, 0.0)


@intrinsic
def f8fma_i(typingctx, p, s, acc):
    """acc + float(p) * s, s a scalar."""

    def cg(context, builder, sig, args):
        s = _splat(builder, context.cast(builder, args[1], sig.args[1], types.float32), _VF)
        return builder.fadd(builder.fmul(builder.sitofp(args[0], _VF), s, flags=_FAST), args[2], flags=_FAST)

    return f32x8(p, s, acc), cg


@intrinsic
def f8fma_i2(typingctx, p, s0, s1, acc):
    """acc + float(p) * (s0 on lanes 0-3, s1 on lanes 4-7): two sub-blocks of 16 values per 32-byte dot."""

    def cg(context, builder, sig, args):
        a = context.cast(builder, args[1], sig.args[1], types.float32)
        b = context.cast(builder, args[2], sig.args[2], types.float32)
        s = ir.Constant(_VF, ir.Undefined)
        for i in range(8):
            s = builder.insert_element(s, a if i < 4 else b, ir.Constant(_I32, i))
        return builder.fadd(builder.fmul(builder.sitofp(args[0], _VF), s, flags=_FAST), args[3], flags=_FAST)

    return f32x8(p, s0, s1, acc), cg


@intrinsic
def f8sum(typingctx, a):
    def cg(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "llvm.vector.reduce.fadd.v8f32", _F32, [_F32, _VF])
        return builder.call(fn, [ir.Constant(_F32, 0.0), args[0]], fastmath=_FAST)

    return types.float32(a), cg


@intrinsic
def f8pair(typingctx, v16, j):
    """From a float32x16 of 16 sub-block scales, lanes 2j (on lanes 0-3) and 2j+1 (on lanes 4-7): the scale
    of each 4-lane group of a 32-value idot whose two halves are sub-blocks of 16."""

    def cg(context, builder, sig, args):
        j2 = builder.mul(
            builder.trunc(context.cast(builder, args[1], sig.args[1], types.int64), _I32),
            ir.Constant(_I32, 2),
        )
        idx = builder.add(_splat(builder, j2, _VI), ir.Constant(_VI, [0, 0, 0, 0, 1, 1, 1, 1]))
        out = ir.Constant(_VF, ir.Undefined)
        for i in range(8):  # a variable-index gather of 8 lanes: one vpermps where available
            lane = builder.extract_element(idx, ir.Constant(_I32, i))
            out = builder.insert_element(out, builder.extract_element(args[0], lane), ir.Constant(_I32, i))
        return out

    return f32x8(v16, j), cg


@intrinsic
def f8fma_iv(typingctx, p, s, acc):
    """acc + float(p) * s, s a float32x8."""

    def cg(context, builder, sig, args):
        return builder.fadd(
            builder.fmul(builder.sitofp(args[0], _VF), args[1], flags=_FAST), args[2], flags=_FAST
        )

    return f32x8(p, s, acc), cg


@intrinsic
def f8scale(typingctx, v, s):
    """float32x8 v * scalar s."""

    def cg(context, builder, sig, args):
        return builder.fmul(
            args[0],
            _splat(builder, context.cast(builder, args[1], sig.args[1], types.float32), _VF),
            flags=_FAST,
        )

    return f32x8(v, s), cg
