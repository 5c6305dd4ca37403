"""The Numba CPU backend: pyquant.backend's interface over the kernels of this package.

Weights stay in their GGUF bytes (memory-mapped); every linear runs on the packed rows (linear.py), the
KV cache keeps f32/f16/q8_0/q4_0 rows that attention reads in place (attention.py), and the small ops are
fused one-pass kernels (ops.py). Activations are C-contiguous float32 numpy arrays.

Files from `pyquant quantize` with composite linears (pyquant/ptq/runtime.py: gq, w8a8, int8_mixed, w4a4)
and Atom's quantized KV cache are dispatched as the numpy backend dispatches them (a weight with a
`.linear` method, a runtime.QuantKVCache) to composite.py's kernels, through the adapters at the end.
"""

from __future__ import annotations

import numpy as np

from pyquant.backend import rope_cos_sin
from pyquant.errors import PyquantError
from pyquant.gguf import TensorInfo
from pyquant.ptq import runtime

from . import act_quant, attention, composite, jit, linear, ops
from .formats import FORMATS


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
        self.threads = jit.set_threads(threads)
        self.cache_type = cache_type
        self._rope_tables: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._act = None
        self._weights: dict[str, PackedWeight] = {}  # by GGUF name, to find the groups below
        self._groups: dict[int, list[PackedWeight]] = {}
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._composites: dict[int, tuple[object, object]] = {}  # id -> (runtime weight, its kernel adapter)
        self._act_memo: dict = {}  # the composite linears' last quantized activations

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
        if hasattr(w, "linear"):  # composite PTQ weights (pyquant/ptq/runtime.py)
            y = self._composite(w)(_f32(x), self._act_memo)
        elif pending is not None and pending[0] is x:  # computed with the first weight of its group
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

    def _composite(self, w):
        entry = self._composites.get(id(w))
        if entry is None:
            entry = self._composites[id(w)] = (w, composite_linear(w))
        return entry[1]

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

    def compile_counts(self) -> tuple[int, int]:
        return jit.compile_counts()

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
        if isinstance(cache, runtime.QuantKVCache):
            return self._attention_quant(q, k, v, cache, layer, pos0, scale, window)
        kc, vc = cache.k[layer], cache.v[layer]
        act_quant.store_kv(kc, vc, pos0, _f32(k), _f32(v), cache.code)
        out = np.empty((t, n_head, v.shape[2]), np.float32)
        attention.ATTEND[cache.type](out, _f32(q), kc, vc, pos0, np.float32(scale), int(window))
        return out.reshape(t, -1)

    def _attention_quant(self, q, k, v, cache, layer, pos0, scale, window):
        """Atom's quantized KV cache: k, v stored as codes, positions 0..end decoded to float32 rows for the
        float32 attention kernel."""
        t, n_head, _ = q.shape
        end = pos0 + t
        if k.shape[2] % 32 or v.shape[2] % 32:
            raise PyquantError(f"head sizes {k.shape[2]}/{v.shape[2]} are not multiples of 32")
        rows = []
        for store, x in ((cache.k[layer], k), (cache.v[layer], v)):
            x = np.ascontiguousarray(store.encode(_f32(x)))  # the static K shift/scale, as numpy's store does
            composite.store_kv_quant(store.codes, store.scale, store.min, pos0, x, store.bits)
            f = np.empty((end, *store.codes.shape[1:]), np.float32)
            composite.dequantize_kv(f, store.codes[:end], store.scale[:end], store.min[:end])
            rows.append(np.ascontiguousarray(store.decode(f), np.float32).view(np.uint8))
        out = np.empty((t, n_head, v.shape[2]), np.float32)
        attention.ATTEND["f32"](out, _f32(q), rows[0], rows[1], pos0, np.float32(scale), int(window))
        return out.reshape(t, -1)


# --- composite PTQ linears -------------------------------------------------------------------------------------


class IntLinear:
    """w8a8, int8_mixed and w4a4 for composite.matmul_int: channels read in `perm` order and cut into
    segments (starts), each with weight bytes code + offset, a weight scale per row, and activation codes of
    `bits` bits with clip ratio `clip` quantized per token."""

    def __init__(self, perm, codes, offsets, ws, starts, bits, clip):
        self.perm = np.ascontiguousarray(perm, np.int64)
        self.wu = np.ascontiguousarray(codes.astype(np.int16) + np.repeat(offsets, np.diff(starts))).astype(
            np.uint8
        )
        self.ws = np.ascontiguousarray(ws, np.float32)
        self.starts, self.offsets = np.asarray(starts, np.int64), np.asarray(offsets, np.int64)
        self.bits, self.clip = np.asarray(bits, np.int64), np.asarray(clip, np.float64)
        self.act_key = b"".join(a.tobytes() for a in (self.perm, self.starts, self.bits, self.clip))

    def __call__(self, x: np.ndarray, memo: dict | None = None) -> np.ndarray:
        """memo: the last activations quantized, kept by the backend: q/k/v (and gate/up) read the same x in
        the same channel order, quantized once."""
        memo = {} if memo is None else memo
        if memo.get("x") is x and memo.get("key") == self.act_key:
            q, s, qsum = memo["act"]
        else:
            t, j = x.shape[0], len(self.starts) - 1
            q, s = np.empty((t, len(self.perm)), np.int8), np.empty((t, j), np.float32)
            qsum = np.empty((t, j), np.int64)
            composite.quantize_act(q, s, qsum, x, self.perm, self.starts, self.bits, self.clip)
            memo.update(x=x, key=self.act_key, act=(q, s, qsum))
        y = np.empty((x.shape[0], self.wu.shape[0]), np.float32)  # (T, N)
        composite.matmul_int(y, self.wu, self.ws, self.starts, self.offsets, q, s, qsum)
        return y


class MixedLinear(IntLinear):
    """LLM.int8(): columns with any |x| > threshold taken out of the int8 product and added in float, as
    bitsandbytes does with a float GEMM: the few outlier columns of x and of the dequantized weight gathered
    into contiguous matrices for one BLAS product (a prefill chunk of a real model can hold hundreds)."""

    def __init__(self, w: runtime.Int8Mixed):
        k = w.shape[1]
        super().__init__(np.arange(k), w.w.codes, [128], w.w.scale, [0, k], [8], [1.0])
        self.threshold = np.float32(w.threshold)
        self.row_scale = np.ascontiguousarray(self.ws[:, 0])

    def __call__(self, x: np.ndarray, memo: dict | None = None) -> np.ndarray:
        mask = np.empty(x.shape[1], np.bool_)
        if not composite.outlier_columns(mask, x, self.threshold):
            return super().__call__(x, memo)
        cols = np.flatnonzero(mask)
        regular = x.copy()
        regular[:, cols] = 0
        y = super().__call__(regular)
        w_out = (self.wu[:, cols].astype(np.int16) - 128).astype(np.float32) * self.row_scale[
            :, None
        ]  # (N, C)
        y += x[:, cols] @ w_out.T
        return y


class GroupLinear:
    """Weight-only "gq": codes packed as in the file, decoded a row at a time (composite.matmul_gq)."""

    def __init__(self, w: runtime.GroupInt):
        n, k = w.codes.shape
        if w.bits != 8 and k % 8:
            raise PyquantError(f"gq weights of {k} columns: the CPU kernels take multiples of 8")
        self.bits, self.lo = w.bits, runtime.code_range(w.bits, w.sym)[0]
        self.packed = runtime.pack_codes(w.codes, w.bits, w.sym).view(np.uint8)
        self.scale = np.ascontiguousarray(w.scale, np.float32)
        self.mins = np.ascontiguousarray(w.zero if w.zero is not None else np.empty((n, 0)), np.float32)

    def __call__(self, x: np.ndarray, memo: dict | None = None) -> np.ndarray:
        y = np.empty((x.shape[0], self.packed.shape[0]), np.float32)
        composite.matmul_gq(y, self.packed, self.scale, self.mins, x, self.bits, self.lo)
        return y


def composite_linear(w):
    """The kernel adapter of a runtime composite weight (WeightOnly, W8A8, Int8Mixed, W4A4)."""
    if isinstance(w, runtime.WeightOnly):
        return GroupLinear(w.w)
    if isinstance(w, runtime.Int8Mixed):
        return MixedLinear(w)
    if isinstance(w, runtime.W8A8):
        k = w.shape[1]
        return IntLinear(np.arange(k), w.w.codes, [128], w.w.scale, [0, k], [8], [1.0])
    if isinstance(w, runtime.W4A4):
        g, n_normal = w.a_group, w.n_normal
        if w.normal.group != g:
            raise PyquantError(f"w4a4 weight group {w.normal.group} differs from the activation group {g}")
        n_groups = n_normal // g
        starts = list(range(0, n_normal + 1, g))
        offsets, ws, bits = [2 ** (w.normal.bits - 1)] * n_groups, [w.normal.scale], [w.a_bits] * n_groups
        clip, codes = [w.a_clip] * n_groups, [w.normal.codes]
        if w.outlier is not None:
            starts.append(w.shape[1])
            offsets, bits, clip = offsets + [128], bits + [8], clip + [1.0]
            ws.append(w.outlier.scale)
            codes.append(w.outlier.codes)
        return IntLinear(
            w.perm, np.concatenate(codes, axis=1), offsets, np.concatenate(ws, axis=1), starts, bits, clip
        )
    raise PyquantError(f"the CPU backend has no kernels for composite weights of type {type(w).__name__}")
