"""The two integer dot-product instructions the int8 kernels use, as inline PTX inside Numba kernels.

    dp4a(a, b, c)        c + the four int8 products of the packed words a and b (PTX dp4a.s32.s32)
    mma_s8(a0..a3, b0, b1, c0..c3)
                         one warp-wide mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA, "Matrix
                         Fragments for mma.m16n8k32"): A 16x32 int8 row-major in a0..a3, B 32x8 int8
                         column-major in b0, b1, C/D 16x8 int32 in c0..c3 / the returned four words; every
                         lane of the warp must call it.

Inline assembly, not a .cu file linked through cuda.declare_device: without link-time optimization a linked
function stays a call whose result comes back through local memory (the PTX of the dp4a GEMM held 48 calls
and 33 local loads/stores); inline, each is one instruction. The CUDA simulator runs no PTX, so there the
same two functions are written in Python (the mma one exchanges fragments through shared memory, as the warp
does in registers).
"""

from __future__ import annotations

import numpy as np
from numba import cuda, int32, types

from .jit import SIM, device

if SIM:

    @device
    def _s8(w, j):
        b = (int(w) >> (8 * j)) & 0xFF  # a Python int: the words may come as numpy uint32
        return b - 256 if b >= 128 else b

    @device
    def dp4a(a, b, c):
        return c + _s8(a, 0) * _s8(b, 0) + _s8(a, 1) * _s8(b, 1) + _s8(a, 2) * _s8(b, 2) + _s8(a, 3) * _s8(b, 3)

    # where each (row, k) of A and (k, col) of B sits in the warp's fragments: (lane, register, byte)
    _r, _k = np.meshgrid(np.arange(16), np.arange(32), indexing="ij")
    _A_AT = (4 * (_r % 8) + (_k % 16) // 4, _r // 8 + 2 * (_k // 16), _k % 4)
    _k, _c = np.meshgrid(np.arange(32), np.arange(8), indexing="ij")
    _B_AT = (4 * _c + (_k % 16) // 4, _k // 16, _k % 4)

    @device
    def mma_s8(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        fa = cuda.shared.array((1024, 4), int32)
        fb = cuda.shared.array((1024, 2), int32)
        tid = cuda.threadIdx.x
        base = tid - tid % 32
        lane = tid % 32
        fa[tid, 0], fa[tid, 1], fa[tid, 2], fa[tid, 3] = a0, a1, a2, a3
        fb[tid, 0], fb[tid, 1] = b0, b1
        cuda.syncthreads()
        a = np.ascontiguousarray(fa[base : base + 32]).view(np.int8).reshape(32, 4, 4)[_A_AT]
        b = np.ascontiguousarray(fb[base : base + 32]).view(np.int8).reshape(32, 2, 4)[_B_AT]
        d = a.astype(np.int64) @ b.astype(np.int64)  # (16, 8)
        g, tig = lane // 4, lane % 4
        cuda.syncthreads()
        return (c0 + int(d[g, 2 * tig]), c1 + int(d[g, 2 * tig + 1]), c2 + int(d[g + 8, 2 * tig]),
                c3 + int(d[g + 8, 2 * tig + 1]))

else:
    from llvmlite import ir

    try:
        from numba.cuda.extending import intrinsic
    except ImportError:  # older numba-cuda
        from numba.core.extending import intrinsic

    _I32 = ir.IntType(32)

    def _i32_args(builder, context, sig, args):
        return [context.cast(builder, v, t, types.int32) for v, t in zip(args, sig.args)]

    @intrinsic
    def dp4a(typingctx, a, b, c):
        sig = types.int32(a, b, c)

        def codegen(context, builder, sig, args):
            fty = ir.FunctionType(_I32, [_I32] * 3)
            return builder.asm(fty, "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r",
                               _i32_args(builder, context, sig, args), side_effect=False)

        return sig, codegen

    @intrinsic
    def mma_s8(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        sig = types.UniTuple(types.int32, 4)(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

        def codegen(context, builder, sig, args):
            fty = ir.FunctionType(ir.LiteralStructType([_I32] * 4), [_I32] * 10)
            r = builder.asm(fty, "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {$0, $1, $2, $3}, "
                            "{$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};", "=r,=r,=r,=r" + ",r" * 10,
                            _i32_args(builder, context, sig, args), side_effect=False)
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(r, i) for i in range(4)])

        return sig, codegen
