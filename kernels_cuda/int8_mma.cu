// Integer dot-product instructions for kernels_cuda/gemm_int8.py, linked into Numba kernels through
// cuda.declare_device (Numba ABI: the result goes through the first pointer, the int return is the status).
//
//   pq_dp4a:   __dp4a, four int8 products of two packed words added to an int32
//   pq_mma_s8: one warp-wide mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA, "Matrix Fragments
//              for mma.m16n8k32"): A 16x32 int8 row-major in a0..a3, B 32x8 int8 column-major in b0..b1,
//              C/D 16x8 int32 in c0..c3 / the returned four words; every lane of the warp must call it.

struct pq_i32x4 {
    int x, y, z, w;
};

extern "C" __device__ int pq_dp4a(int *ret, int a, int b, int c)
{
    *ret = __dp4a(a, b, c);
    return 0;
}

extern "C" __device__ int pq_mma_s8(pq_i32x4 *ret, int a0, int a1, int a2, int a3, int b0, int b1, int c0, int c1,
                                    int c2, int c3)
{
    int d0, d1, d2, d3;
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%10, %11, %12, %13};\n"
                 : "=r"(d0), "=r"(d1), "=r"(d2), "=r"(d3)
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(c0), "r"(c1), "r"(c2), "r"(c3));
    ret->x = d0;
    ret->y = d1;
    ret->z = d2;
    ret->w = d3;
    return 0;
}
