"""Numba CPU backend: kernels that compute on GGUF's packed blocks (make_backend("cpu") -> CpuBackend).

simd.py         16-lane float32/int32 vector values and their ops (generic LLVM IR)
jit.py          decorator presets (cached, nogil; fastmath only where a tolerance is promised)
quants_32.py    register decoders of q4_0 .. q8_0 and float rows;  quants_k.py  of q2_k .. q6_k
formats.py      format codes, block geometry, the decoder table
linear.py       matvec (decode) and panel matmul (prefill) on packed rows
act_quant.py    float32 rows -> q8_0 / q4_0 / f16 bytes (KV cache writes)
attention.py    online-softmax attention over the packed KV cache
ops.py          RMSNorm, RoPE, SiLU/GELU gated units
composite.py    PTQ composite linears (w8a8, int8_mixed, w4a4, gq) and the quantized KV cache
backend.py      CpuBackend, the interface pyquant.model calls
"""
