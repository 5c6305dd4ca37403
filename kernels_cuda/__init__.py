"""Numba-CUDA backend: dequantizing GEMV per block format, int8 GEMMs (dp4a, mma.sync), fused ops,
attention over f16/q8_0/q4_0 KV caches, and CudaBackend (backend.py) that pyquant's transformer runs on."""
