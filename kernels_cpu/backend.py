"""The Numba CPU backend: pyquant.backend's interface over the kernels of this package.

Weights stay in their GGUF bytes (memory-mapped); every linear runs on the packed rows (linear.py), the
KV cache keeps f32/f16/q8_0/q4_0 rows that attention reads in place (attention.py), and the small ops are
fused one-pass kernels (ops.py). Activations are C-contiguous float32 numpy arrays.
"""

from __future__ import annotations

import numpy as np

from pyquant.backend import rope_cos_sin
from pyquant.errors import PyquantError
from pyquant.gguf import TensorInfo

from . import act_quant, attention, linear, ops
from .formats import FORMATS
from .jit import set_threads

CACHE_TYPES = ("f16", "f32", "q8_0", "q4_0")
# From this many tokens on, linears decode 32-row float32 panels once and reuse them (matmul); below, each
# row's int8 dot products run per token while its bytes sit in L1 (matvec). Measured crossover on qwen's
# weights, 1 thread: 8 (q6_k) to 16 (q5_0) tokens.
MATMUL_MIN_TOKENS = 10
PARALLEL_MIN_VALUES = 1 << 16  # elementwise ops on fewer values stay on the calling thread
# Weights the transformer applies to one input in a row (GGUF names): the lead's linear runs them all.
GROUPS = {"attn_q": ("attn_k", "attn_v"), "ffn_gate": ("ffn_up",)}


class PackedWeight:
    """A weight matrix as the kernels take it: (N, row_bytes) uint8 rows (zero-copy, read-only) + format."""

    __slots__ = ("dequantize", "matmul", "matvec", "name", "quantized", "rows", "shape", "type")

    def __init__(self, name: str, type: str, shape: tuple[int, int], data: np.ndarray):
        if type not in FORMATS:
            raise PyquantError(
                f"{name}: the CPU backend has no kernels for {type} weights (supported: {', '.join(FORMATS)})"
            )
        fmt = FORMATS[type]
        if len(shape) != 2 or shape[1] % fmt.block_values:
            raise PyquantError(f"{name}: shape {shape} is not a matrix of whole {type} blocks")
        rows = np.asarray(data).view(np.ndarray).reshape(-1).view(np.uint8)
        rows = rows.reshape(shape[0], shape[1] // fmt.block_values * fmt.block_bytes)
        if rows.flags.writeable:
            rows = rows.view()
            rows.flags.writeable = False
        self.name, self.type, self.shape, self.rows = name, type, tuple(shape), rows
        self.quantized = fmt.quantized
        self.matvec, self.matmul = linear.MATVEC[type], linear.MATMUL[type]
        self.dequantize = linear.DEQUANTIZE[type]

    @classmethod
    def from_tensor(cls, t: TensorInfo) -> PackedWeight:
        return cls(t.name, t.type, t.shape, t.data)


class KVCache:
    """Per layer, K and V rows in the cache type's block bytes: (n_ctx, G, row_bytes) uint8 each."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim_k: int, head_dim_v: int, type: str):
        fmt = FORMATS[type]
        if head_dim_k % 32 or head_dim_v % 32:
            raise PyquantError(f"head sizes {head_dim_k}/{head_dim_v} are not multiples of 32")
        self.n_ctx, self.type, self.code = n_ctx, type, fmt.code
        rb_k = head_dim_k // 32 * fmt.block_bytes
        rb_v = head_dim_v // 32 * fmt.block_bytes
        self.k = [np.zeros((n_ctx, n_head_kv, rb_k), np.uint8) for _ in range(n_layer)]
        self.v = [np.zeros((n_ctx, n_head_kv, rb_v), np.uint8) for _ in range(n_layer)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class CpuBackend:
    name = "cpu"

    def __init__(self, threads: int | None = None, cache_type: str = "f16"):
        if cache_type not in CACHE_TYPES:
            raise PyquantError(
                f"unknown KV cache type {cache_type!r}; choose one of {', '.join(CACHE_TYPES)}"
            )
        self.threads = set_threads(threads)
        self.cache_type = cache_type
        self._rope_tables: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._act = None
        self._weights: dict[str, PackedWeight] = {}  # by GGUF name, to find the groups below
        self._groups: dict[int, list[PackedWeight]] = {}
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # --- weights ---------------------------------------------------------------------------------------
    def weight(self, t: TensorInfo) -> PackedWeight:
        w = self._weights[t.name] = PackedWeight.from_tensor(t)
        return w

    # --- ops ---------------------------------------------------------------------------------------------
    def get_rows(self, w: PackedWeight, ids: np.ndarray) -> np.ndarray:  # (T, D)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= w.shape[0]):
            raise PyquantError(f"{w.name}: row id out of range [0, {w.shape[0]})")
        out = np.empty((len(ids), w.shape[1]), np.float32)
        w.dequantize(out, w.rows, ids)
        return out

    def linear(self, x: np.ndarray, w: PackedWeight, bias: np.ndarray | None = None) -> np.ndarray:
        pending = self._pending.pop(id(w), None)
        if pending is not None and pending[0] is x:  # computed with the first weight of its group
            y = pending[1]
        else:
            y = np.empty((x.shape[0], w.shape[0]), np.float32)  # (T, N)
            if x.shape[0] >= MATMUL_MIN_TOKENS:
                w.matmul(y, w.rows, _f32(x))
            elif not w.quantized:
                w.matvec(y, w.rows, _f32(x))
            else:
                group = self._group(w)
                if len(group) > 1:
                    ys = [y] + [np.empty((x.shape[0], g.shape[0]), np.float32) for g in group[1:]]
                    act = self._int8_activations(x)
                    linear.matvec_group(ys, [g.rows for g in group], [g.type for g in group], *act)
                    self._pending = {id(g): (x, yg) for g, yg in zip(group[1:], ys[1:])}
                else:
                    w.matvec(y, w.rows, *self._int8_activations(x))
        if bias is not None:
            y += bias
        return y

    def _group(self, w: PackedWeight) -> list[PackedWeight]:
        """w and the quantized weights the model applies to the same activations right after it (attn_k and
        attn_v after attn_q, ffn_up after ffn_gate): a decode step runs each group in one parallel region.
        Found by GGUF tensor name; a weight that leads no group is a group of one."""
        group = self._groups.get(id(w))
        if group is None:
            group = [w]
            for lead, followers in GROUPS.items():
                if f".{lead}." in w.name:
                    names = [w.name.replace(f".{lead}.", f".{f}.") for f in followers]
                    found = [self._weights.get(n) for n in names]
                    if all(g is not None and g.quantized for g in found):
                        group += found
            self._groups[id(w)] = group
        return group

    def _int8_activations(self, x: np.ndarray):
        """x (T, K) as int8 blocks (codes, scales, sums of 16); the last one is kept, as the model feeds the
        same activations to q/k/v and to gate/up in a row."""
        if self._act is not None and self._act[0] is x:
            return self._act[1]
        t, k = x.shape
        if k % 32:
            raise PyquantError(f"activation width {k} is not a multiple of 32")
        act = (
            np.empty((t, k), np.int8),
            np.empty((t, k // 32), np.float32),
            np.empty((t, k // 16), np.float32),
        )
        act_quant.quantize_act(*act, _f32(x))
        self._act = (x, act)
        return act

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        x = _f32(x)
        out = np.empty_like(x)
        ops.rms_norm(out.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1]), _f32(weight), float(eps))
        return out

    def rope(
        self,
        x: np.ndarray,
        positions: np.ndarray,
        n_rot: int,
        base: float,
        neox: bool,
        freq_scale: float = 1.0,
    ) -> np.ndarray:
        """x (T, H, Dh): rotate the first n_rot dims; NeoX pairs (i, i + n_rot/2), normal pairs (2i, 2i+1)."""
        x = _f32(x)
        cos, sin = self._rope_table(positions, n_rot, base, freq_scale)
        out = np.empty_like(x)
        ops.rope(out, x, cos, sin, n_rot, bool(neox))
        return out

    def _rope_table(self, positions, n_rot, base, freq_scale):
        positions = np.asarray(positions)
        key = (positions.tobytes(), n_rot, float(base), float(freq_scale))
        table = self._rope_tables.get(key)
        if table is None:
            if len(self._rope_tables) > 64:
                self._rope_tables.clear()
            cos, sin = rope_cos_sin(positions, n_rot, base, freq_scale)
            table = self._rope_tables[key] = (_f32(cos), _f32(sin))
        return table

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        gate, up = _f32(gate), _f32(up)
        out = np.empty_like(gate)
        (ops.swiglu if gate.size >= PARALLEL_MIN_VALUES else ops.swiglu_serial)(
            out.reshape(-1), gate.reshape(-1), up.reshape(-1)
        )
        return out

    def geglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        gate, up = _f32(gate), _f32(up)
        out = np.empty_like(gate)
        (ops.geglu if gate.size >= PARALLEL_MIN_VALUES else ops.geglu_serial)(
            out.reshape(-1), gate.reshape(-1), up.reshape(-1)
        )
        return out

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.add(a, b, dtype=np.float32)

    def scale(self, x: np.ndarray, s: float) -> np.ndarray:
        return np.multiply(x, np.float32(s), dtype=np.float32)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    def from_host(self, x: np.ndarray) -> np.ndarray:
        return _f32(x)

    # --- attention ---------------------------------------------------------------------------------------
    def new_cache(
        self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim_k: int, head_dim_v: int
    ) -> KVCache:
        return KVCache(n_layer, n_ctx, n_head_kv, head_dim_k, head_dim_v, self.cache_type)

    def attention(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        cache: KVCache,
        layer: int,
        pos0: int,
        scale: float,
        window: int = 0,
    ) -> np.ndarray:
        """Store k, v (T, G, Dh) at positions pos0.. then attend q (T, H, Dh) causally -> (T, H*Dv)."""
        t, n_head, _ = q.shape
        kc, vc = cache.k[layer], cache.v[layer]
        act_quant.store_kv(kc, vc, pos0, _f32(k), _f32(v), cache.code)
        out = np.empty((t, n_head, v.shape[2]), np.float32)
        attention.ATTEND[cache.type](out, _f32(q), kc, vc, pos0, np.float32(scale), int(window))
        return out.reshape(t, -1)
