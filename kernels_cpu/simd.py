"""Vector registers for Numba kernels: 16-lane float32 and int32 values and the few operations on them.

Numba's plain loops vectorize poorly on block formats: its integer arithmetic is 64-bit, so the int8 dot
products LLVM would turn into vpmaddwd stay scalar, and a 32-value inner loop is unrolled before the loop
vectorizer sees it. These two types make a register an ordinary SSA value (LLVM `<16 x float>`,
`<16 x i32>`), so a kernel says which work is one vector instruction and LLVM only has to pick the encoding
(one zmm op with AVX-512, two ymm ops with AVX2). Every op is generic LLVM IR: nothing here assumes an ISA.

Names follow C intrinsics loosely: `f*` float32x16, `i*` int32x16, `*_at` scalars at a byte offset.
Array arguments are 1-D views; an index counts elements of the array (bytes for uint8 arrays), no wraparound.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_VF = ir.VectorType(_F32, LANES)
_VI = ir.VectorType(_I32, LANES)
_FAST = ("fast",)


class F32x16Type(types.Type):
    def __init__(self):
        super().__init__(name="f32x16")


class I32x16Type(types.Type):
    def __init__(self):
        super().__init__(name="i32x16")


f32x16 = F32x16Type()
i32x16 = I32x16Type()


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF)


@register_model(I32x16Type)
class _I32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VI)


# --- helpers for the code generators ----------------------------------------------------------------------
def _ptr(context, builder, aryty, ary, idx, elem: ir.Type):
    """Pointer to element idx of a 1-D array, typed as `elem`."""
    a = context.make_array(aryty)(context, builder, value=ary)
    p = cgutils.get_item_pointer(context, builder, aryty, a, [idx], wraparound=False)
    return builder.bitcast(p, elem.as_pointer())


def _splat(builder, scalar, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _i32(context, builder, val, ty):
    return context.cast(builder, val, ty, types.int32)


def _intrinsic_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


# --- float32 x 16 -----------------------------------------------------------------------------------------
@intrinsic
def fzero(typingctx):
    return f32x16(), lambda context, builder, sig, args: ir.Constant(_VF, [0.0] * LANES)


@intrinsic
def fsplat(typingctx, s):
    def cg(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.float32), _VF)

    return f32x16(s), cg


@intrinsic
def fload(typingctx, arr, idx):
    """16 float32 from arr[idx:idx+16]."""

    def cg(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _VF), align=4)

    return f32x16(arr, idx), cg


@intrinsic
def fstore(typingctx, arr, idx, v):
    """arr[idx:idx+16] = v (float32 array)."""

    def cg(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1], _VF), align=4)
        return context.get_dummy_value()

    return types.none(arr, idx, v), cg


@intrinsic
def fload_h(typingctx, arr, idx):
    """16 IEEE halves (a uint16 array, or a uint8 array at byte offset idx) -> float32, exactly."""

    def cg(context, builder, sig, args):
        h = builder.load(
            _ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(ir.HalfType(), LANES)),
            align=1,
        )
        return builder.fpext(h, _VF)

    return f32x16(arr, idx), cg


@intrinsic
def fstore_h(typingctx, arr, idx, v):
    """uint16 arr[idx:idx+16] = v rounded to IEEE half (round to nearest even, as GGML_FP32_TO_FP16)."""

    def cg(context, builder, sig, args):
        h = builder.fptrunc(args[2], ir.VectorType(ir.HalfType(), LANES))
        builder.store(h, _ptr(context, builder, sig.args[0], args[0], args[1], h.type), align=1)
        return context.get_dummy_value()

    return types.none(arr, idx, v), cg


@intrinsic
def fload_bf(typingctx, arr, idx):
    """16 bfloat16 (a uint16 array, or a uint8 array at byte offset idx) -> float32."""

    def cg(context, builder, sig, args):
        u = builder.load(
            _ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(ir.IntType(16), LANES)),
            align=1,
        )
        u = builder.shl(builder.zext(u, _VI), ir.Constant(_VI, [16] * LANES))
        return builder.bitcast(u, _VF)

    return f32x16(arr, idx), cg


def _binary_f(op):
    @intrinsic
    def impl(typingctx, a, b):
        def cg(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1], flags=_FAST)

        return f32x16(a, b), cg

    return impl


fadd = _binary_f("fadd")
fsub = _binary_f("fsub")
fmul = _binary_f("fmul")


@intrinsic
def ffma(typingctx, a, b, c):
    """a * b + c (fused where the target has FMA)."""

    def cg(context, builder, sig, args):
        return builder.fadd(builder.fmul(args[0], args[1], flags=_FAST), args[2], flags=_FAST)

    return f32x16(a, b, c), cg


@intrinsic
def fmax(typingctx, a, b):
    def cg(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "llvm.maxnum.v16f32", _VF, [_VF, _VF])
        return builder.call(fn, [args[0], args[1]])

    return f32x16(a, b), cg


def _unary_f(name):
    @intrinsic
    def impl(typingctx, a):
        def cg(context, builder, sig, args):
            return builder.call(_intrinsic_fn(builder, f"llvm.{name}.v16f32", _VF, [_VF]), [args[0]])

        return f32x16(a), cg

    impl.__doc__ = f"llvm.{name}, lane-wise"
    return impl


fabs = _unary_f("fabs")
frint = _unary_f("rint")  # to nearest integer, halves to even


@intrinsic
def fstore_i8(typingctx, arr, idx, v):
    """int8 arr[idx:idx+16] = v (integral values in -128..127)."""

    def cg(context, builder, sig, args):
        b = builder.trunc(builder.fptosi(args[2], _VI), ir.VectorType(ir.IntType(8), LANES))
        builder.store(b, _ptr(context, builder, sig.args[0], args[0], args[1], b.type), align=1)
        return context.get_dummy_value()

    return types.none(arr, idx, v), cg


@intrinsic
def fsum(typingctx, a):
    """Sum of the 16 lanes (tree order)."""

    def cg(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "llvm.vector.reduce.fadd.v16f32", _F32, [_F32, _VF])
        return builder.call(fn, [ir.Constant(_F32, 0.0), args[0]], fastmath=_FAST)

    return types.float32(a), cg


@intrinsic
def fhmax(typingctx, a):
    """Largest of the 16 lanes."""

    def cg(context, builder, sig, args):
        fn = _intrinsic_fn(builder, "llvm.vector.reduce.fmax.v16f32", _F32, [_VF])
        return builder.call(fn, [args[0]])

    return types.float32(a), cg


# --- int32 x 16 ---------------------------------------------------------------------------------------------
@intrinsic
def iload_u8(typingctx, arr, idx):
    """16 bytes arr[idx:idx+16], zero-extended."""

    def cg(context, builder, sig, args):
        v = builder.load(
            _ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(ir.IntType(8), LANES)),
            align=1,
        )
        return builder.zext(v, _VI)

    return i32x16(arr, idx), cg


@intrinsic
def iload_i8(typingctx, arr, idx):
    """16 bytes arr[idx:idx+16], sign-extended."""

    def cg(context, builder, sig, args):
        v = builder.load(
            _ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(ir.IntType(8), LANES)),
            align=1,
        )
        return builder.sext(v, _VI)

    return i32x16(arr, idx), cg


@intrinsic
def isplat(typingctx, s):
    def cg(context, builder, sig, args):
        return _splat(builder, _i32(context, builder, args[0], sig.args[0]), _VI)

    return i32x16(s), cg


def _binary_i(op):
    @intrinsic
    def impl(typingctx, a, b):
        """Lane-wise op; b is an i32x16 or a scalar applied to every lane."""

        def cg(context, builder, sig, args):
            rhs = args[1]
            if not isinstance(sig.args[1], I32x16Type):
                rhs = _splat(builder, _i32(context, builder, rhs, sig.args[1]), _VI)
            return getattr(builder, op)(args[0], rhs)

        return i32x16(a, b), cg

    return impl


iand = _binary_i("and_")
ior = _binary_i("or_")
iadd = _binary_i("add")
isub = _binary_i("sub")
imul = _binary_i("mul")
ishr = _binary_i("lshr")  # logical: the codes are unsigned
ishl = _binary_i("shl")


@intrinsic
def ibits(typingctx, h):
    """Lane j = bit j of the scalar h (j = 0..15)."""

    def cg(context, builder, sig, args):
        v = _splat(builder, _i32(context, builder, args[0], sig.args[0]), _VI)
        v = builder.lshr(v, ir.Constant(_VI, list(range(LANES))))
        return builder.and_(v, ir.Constant(_VI, [1] * LANES))

    return i32x16(h), cg


@intrinsic
def itof(typingctx, a):
    def cg(context, builder, sig, args):
        return builder.sitofp(args[0], _VF)

    return f32x16(a), cg


# --- scalars at a byte offset ---------------------------------------------------------------------------------
@intrinsic
def half_at(typingctx, arr, idx):
    """The IEEE half at byte offset idx of a uint8 array, as float32 (exact)."""

    def cg(context, builder, sig, args):
        h = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], ir.HalfType()), align=1)
        return builder.fpext(h, _F32)

    return types.float32(arr, idx), cg


@intrinsic
def f32_at(typingctx, arr, idx):
    """The float32 at byte offset idx of a uint8 array."""

    def cg(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _F32), align=1)

    return types.float32(arr, idx), cg


@intrinsic
def u32_at(typingctx, arr, idx):
    """The little-endian uint32 at byte offset idx of a uint8 array, as int64."""

    def cg(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _I32), align=1)
        return builder.zext(v, ir.IntType(64))

    return types.int64(arr, idx), cg


@intrinsic
def to_half(typingctx, x):
    """float32 -> the uint16 bits of the nearest IEEE half (round to nearest even)."""

    def cg(context, builder, sig, args):
        h = builder.fptrunc(context.cast(builder, args[0], sig.args[0], types.float32), ir.HalfType())
        return builder.bitcast(h, ir.IntType(16))

    return types.uint16(x), cg


@intrinsic
def from_half(typingctx, bits):
    """uint16 bits of an IEEE half -> float32 (exact)."""

    def cg(context, builder, sig, args):
        b = context.cast(builder, args[0], sig.args[0], types.uint16)
        return builder.fpext(builder.bitcast(b, ir.HalfType()), _F32)

    return types.float32(bits), cg


# --- register files: a few vectors on the stack, promoted to registers when indexed by constants ------------
@intrinsic
def fregs(typingctx, n):
    """Room for n float32x16 values in the function's frame (n a constant); index with fget/fput."""
    if not isinstance(n, types.IntegerLiteral):
        return None

    def cg(context, builder, sig, args):
        return cgutils.alloca_once(builder, _VF, size=context.get_constant(types.intp, n.literal_value))

    return types.CPointer(f32x16)(n), cg


@intrinsic
def fget(typingctx, regs, i):
    def cg(context, builder, sig, args):
        return builder.load(builder.gep(args[0], [args[1]]), align=64)

    return f32x16(regs, i), cg


@intrinsic
def fput(typingctx, regs, i, v):
    def cg(context, builder, sig, args):
        builder.store(args[2], builder.gep(args[0], [args[1]]), align=64)
        return context.get_dummy_value()

    return types.none(regs, i, v), cg


@intrinsic
def fexp(typingctx, a):
    """e**a lane-wise (Cephes expf: 2**n * p(r), |r| <= ln2/2; ~1 ulp), 0 below -87.3, inf above 88.7."""

    def cg(context, builder, sig, args):
        def c(v):
            return ir.Constant(_VF, [v] * LANES)

        def mul(a, b):
            return builder.fmul(a, b, flags=_FAST)

        def add(a, b):
            return builder.fadd(a, b, flags=_FAST)

        x = args[0]
        lo = builder.fcmp_ordered("<", x, c(-87.33654))
        hi = builder.fcmp_ordered(">", x, c(88.72283))
        xc = builder.call(_intrinsic_fn(builder, "llvm.maxnum.v16f32", _VF, [_VF, _VF]), [x, c(-87.33654)])
        xc = builder.call(_intrinsic_fn(builder, "llvm.minnum.v16f32", _VF, [_VF, _VF]), [xc, c(88.72283)])
        n = builder.call(
            _intrinsic_fn(builder, "llvm.floor.v16f32", _VF, [_VF]),
            [add(mul(xc, c(1.44269504088896341)), c(0.5))],
        )
        r = builder.fsub(xc, mul(n, c(0.693359375)))
        r = builder.fsub(r, mul(n, c(-2.12194440e-4)))
        p = c(1.9875691500e-4)
        for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = add(mul(p, r), c(coef))
        p = add(add(mul(mul(p, r), r), r), c(1.0))
        e = builder.shl(
            builder.add(builder.fptosi(n, _VI), ir.Constant(_VI, [127] * LANES)),
            ir.Constant(_VI, [23] * LANES),
        )
        y = mul(p, builder.bitcast(e, _VF))
        y = builder.select(lo, c(0.0), y)
        return builder.select(hi, c(float("inf")), y)

    return f32x16(a), cg


@intrinsic
def fdiv(typingctx, a, b):
    def cg(context, builder, sig, args):
        return builder.fdiv(args[0], args[1])

    return f32x16(a, b), cg


@intrinsic
def ftranspose16(typingctx, regs):
    """Transpose the 16 x 16 matrix held in regs[0..15] (fregs) in place: 4 stages of two-source shuffles,
    each swapping the off-diagonal blocks of size 8, 4, 2, 1 (64 shuffles for 256 values)."""

    def cg(context, builder, sig, args):
        ptrs = [builder.gep(args[0], [ir.Constant(ir.IntType(64), i)]) for i in range(LANES)]
        v = [builder.load(p, align=64) for p in ptrs]
        b = LANES // 2
        while b:
            lo = [c if c & b == 0 else LANES + c - b for c in range(LANES)]  # row r keeps its low-b columns
            hi = [c + b if c & b == 0 else LANES + c for c in range(LANES)]  # row r + b gets r's high ones
            mlo, mhi = (
                ir.Constant(ir.VectorType(_I32, LANES), lo),
                ir.Constant(ir.VectorType(_I32, LANES), hi),
            )
            for r in range(LANES):
                if r & b == 0:
                    v[r], v[r + b] = (
                        builder.shuffle_vector(v[r], v[r + b], mlo),
                        builder.shuffle_vector(v[r], v[r + b], mhi),
                    )
            b //= 2
        for p, x in zip(ptrs, v):
            builder.store(x, p, align=64)
        return context.get_dummy_value()

    return types.none(regs), cg
