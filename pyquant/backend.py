"""The backend interface the transformer calls, and the numpy reference backend.

The model never touches a kernel or branches on a weight's type: it calls these ops. Activations are whatever
array type the backend uses (numpy on CPU, device arrays on CUDA); `to_host` brings logits back. Shapes:
T tokens in flight, D model width, H query heads, G kv heads, Dh head size.

The reference backend is the oracle for the fast ones: plain float32 numpy, weights dequantized once
(lazily) by `pyquant.quants`, a float32 KV cache, attention written as the textbook softmax(QK^T)V.
"""

from __future__ import annotations

import math

import numpy as np

from .gguf import TensorInfo
from .quants import dequantize, q8_0, quantize

# The format ggml rounds activations to before a dot product with a weight of each type (its vec_dot_type).
# Q8_1 holds the same int8 values as Q8_0 (plus a sum), so Q8_0 stands for both here.
VEC_DOT_TYPE = {
    "q4_0": "q8_0", "q4_1": "q8_0", "q5_0": "q8_0", "q5_1": "q8_0", "q8_0": "q8_0",
    "q2_k": "q8_k", "q3_k": "q8_k", "q4_k": "q8_k", "q5_k": "q8_k", "q6_k": "q8_k",
    "f16": "f16", "bf16": "bf16",
}

BACKENDS = {
    "numpy": ("pyquant.backend", "NumpyBackend"),
    "cpu": ("kernels_cpu.backend", "CpuBackend"),
    "cuda": ("kernels_cuda.backend", "CudaBackend"),
}


def make_backend(name: str, **options):
    import importlib

    from .errors import PyquantError

    if name not in BACKENDS:
        raise PyquantError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)


def round_activations(x: np.ndarray, act: str) -> np.ndarray:
    """x as ggml's CPU path sees it after quantizing to `act` (Q8_0 the way its x86 SIMD code rounds)."""
    x = np.ascontiguousarray(x, np.float32)
    if act == "q8_0":
        blocks = q8_0.quantize_blocks_x86(x.reshape(-1, 32))
        return q8_0.dequantize_blocks(blocks).reshape(x.shape)
    return dequantize(quantize(x, act), act, x.shape)


def rope_cos_sin(positions: np.ndarray, n_rot: int, base: float, freq_scale: float = 1.0):
    """cos/sin tables (T, n_rot/2) for rotary embeddings, computed as ggml does: in float32, the angle
    of pair i built by repeated multiplication with powf(base, -2/n_rot) (not an exact power), so the
    tables agree with llama.cpp's to the last bit rather than to 1e-7."""
    f32 = np.float32
    theta_scale = f32(np.power(f32(base), f32(-2.0) / f32(n_rot), dtype=f32))
    theta = positions.astype(f32)
    thetas = np.empty((len(positions), n_rot // 2), f32)
    for i in range(n_rot // 2):
        thetas[:, i] = f32(freq_scale) * theta
        theta = theta * theta_scale
    return np.cos(thetas), np.sin(thetas)


def attention_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int) -> np.ndarray:
    """Boolean (Tq, Tk): causal, and within `window` tokens when the layer slides (window 0: no limit)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window:
        allowed &= q_pos[:, None] - k_pos[None, :] < window
    return allowed


class KVCache:
    """Per-layer K and V for positions [0, n_ctx): (n_ctx, G, Dh) each, float32 or float16."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim_k: int, head_dim_v: int,
                 dtype=np.float32):
        self.n_ctx = n_ctx
        self.dtype = np.dtype(dtype)
        self.k = [np.zeros((n_ctx, n_head_kv, head_dim_k), dtype) for _ in range(n_layer)]
        self.v = [np.zeros((n_ctx, n_head_kv, head_dim_v), dtype) for _ in range(n_layer)]


class NumpyBackend:
    name = "numpy"

    def __init__(self, threads: int | None = None, cache_type: str = "f16", act_quant: bool = True):
        """act_quant: follow llama.cpp's CPU arithmetic rather than exact f32: activations rounded to each
        weight's vec_dot_type before the product (as the integer kernels do), GELU through ggml's f16 table.
        cache_type "f16" (llama.cpp's default) also rounds Q and the attention weights to f16 where ggml's
        f16 dot products do; "f32" keeps everything exact."""
        if cache_type not in ("f32", "f16"):
            from .errors import PyquantError

            raise PyquantError(f"the numpy backend keeps f32 or f16 KV caches, not {cache_type!r}")
        self._weights: dict[int, np.ndarray] = {}
        self.cache_type = cache_type
        self.act_quant = act_quant

    # --- weights ---------------------------------------------------------------------------------------
    def weight(self, t: TensorInfo) -> TensorInfo:
        return t

    def _dense(self, w: TensorInfo) -> np.ndarray:
        key = id(w)
        if key not in self._weights:
            self._weights[key] = dequantize(w.data, w.type, w.shape)
        return self._weights[key]

    # --- ops ---------------------------------------------------------------------------------------------
    def get_rows(self, w: TensorInfo, ids: np.ndarray) -> np.ndarray:  # (T, D)
        row_bytes = w.nbytes // w.shape[0]
        rows = w.data.reshape(w.shape[0], row_bytes)[ids]
        return dequantize(rows, w.type, (len(ids), w.shape[1]))

    def linear(self, x: np.ndarray, w: TensorInfo, bias: np.ndarray | None = None) -> np.ndarray:
        if hasattr(w, "linear"):  # composite PTQ weights (pyquant/ptq/runtime.py) compute their own product
            return w.linear(x) if bias is None else w.linear(x) + bias
        act = VEC_DOT_TYPE.get(w.type) if self.act_quant else None
        if act:
            x = round_activations(x, act)
        y = x @ self._dense(w).T  # (T, K) @ (K, N)
        return y + bias if bias is not None else y

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(ms + eps) * weight

    def rope(self, x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, neox: bool,
             freq_scale: float = 1.0) -> np.ndarray:
        """x (T, H, Dh): rotate the first n_rot dims; NeoX pairs (i, i + n_rot/2), normal pairs (2i, 2i+1)."""
        cos, sin = rope_cos_sin(positions, n_rot, base, freq_scale)
        cos, sin = cos[:, None, :], sin[:, None, :]
        out = x.copy()
        half = n_rot // 2
        if neox:
            a, b = x[..., :half], x[..., half:n_rot]
            out[..., :half] = a * cos - b * sin
            out[..., half:n_rot] = a * sin + b * cos
        else:
            a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
            out[..., 0:n_rot:2] = a * cos - b * sin
            out[..., 1:n_rot:2] = a * sin + b * cos
        return out

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return gate / (1.0 + np.exp(-gate)) * up

    def geglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:  # tanh-approximated GELU, as Gemma
        c = np.float32(math.sqrt(2.0 / math.pi))
        if not self.act_quant:
            return 0.5 * gate * (1.0 + np.tanh(c * (gate + np.float32(0.044715) * gate**3))) * up
        # ggml looks GELU up in a table indexed by the f16 value, holding f16 results, clamped at +-10
        g = gate.astype(np.float16).astype(np.float32)
        table = (0.5 * g * (1.0 + np.tanh(c * (g + np.float32(0.044715) * g**3)))).astype(np.float16)
        return np.where(gate <= -10, 0, np.where(gate >= 10, gate, table.astype(np.float32))) * up

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def scale(self, x: np.ndarray, s: float) -> np.ndarray:
        return x * np.float32(s)

    def compile_counts(self) -> tuple[int, int] | None:
        """(kernels loaded from a disk cache, kernels compiled) in this process; None: nothing is compiled."""
        return None

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    def from_host(self, x: np.ndarray) -> np.ndarray:
        return x

    # --- attention ---------------------------------------------------------------------------------------
    def new_cache(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim_k: int, head_dim_v: int) -> KVCache:
        return KVCache(n_layer, n_ctx, n_head_kv, head_dim_k, head_dim_v, np.float16 if self.cache_type == "f16" else np.float32)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: KVCache, layer: int, pos0: int,
                  scale: float, window: int = 0) -> np.ndarray:
        """Store k, v (T, G, Dh) at positions pos0.. then attend q (T, H, Dh) causally -> (T, H*Dv)."""
        t, n_head, _ = q.shape
        end = pos0 + t
        cache.k[layer][pos0:end] = k
        cache.v[layer][pos0:end] = v
        low = cache.dtype  # f16 caches: ggml's f16 dot products round the other operand to f16 too
        keys = cache.k[layer][:end].astype(np.float32)  # (S, G, Dh)
        values = cache.v[layer][:end].astype(np.float32)
        group = n_head // keys.shape[1]
        keys = np.repeat(keys, group, axis=1).transpose(1, 2, 0)  # (H, Dh, S)
        values = np.repeat(values, group, axis=1).transpose(1, 0, 2)  # (H, S, Dv)
        q = q.astype(low).astype(np.float32)
        scores = np.matmul(q.transpose(1, 0, 2), keys) * np.float32(scale)  # (H, T, S)
        allowed = attention_mask(np.arange(pos0, end), np.arange(end), window)
        scores = np.where(allowed[None], scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores.astype(low).astype(np.float32), values)  # (H, T, Dv)
        return out.transpose(1, 0, 2).reshape(t, -1)
