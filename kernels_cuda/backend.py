"""CudaBackend: pyquant.backend.NumpyBackend's interface on an NVIDIA GPU through numba-cuda.

Activations stay on the device (`launch.Tensor`); `to_host` / `from_host` move them. Weights are uploaded once,
repacked (kernels_cuda/quants.py). Products: the dequantizing GEMV (matvec.py) for up to `gemv_tokens`
tokens, beyond that the block-scaled int8 tensor-core GEMM (gemm_int8.py) on activations quantized per
32 values on the fly (`int8_prefill`), or a float GEMM for weights without integer codes.

Decode runs few launches: RMSNorm and the SwiGLU/GeGLU gates are fused into the product that consumes them
(ops return them unlaunched, `Tensor.pending`), a residual add is folded into the product that feeds it, and
the queue of one decode step is replayed as a CUDA graph (launch.py). With one token, products of the same
input join one launch (q, k, v; gate and up, with the gate computed in it: `_Decode`; that launch also leaves
the gate's output quantized for ffn_down, `_q8_input`), RoPE stays pending until attention turns q and k as it
stores K and V (attend1 for one token, with gemma3's q/k norms), so a llama/qwen layer is 5 launches. `replay_step`
records a whole decode step and runs it again for the next token without the model's Python: the token and
position go into the parameter block, then one graph launch and the logits copy. `replay_greedy` runs the
recorded step with the device argmax after it (argmax.py: the chosen token and the next position go straight
into the parameter block) n times back to back, then copies the n tokens back once: no host round trip a token.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from pyquant.backend import rope_cos_sin
from pyquant.errors import PyquantError
from pyquant.gguf import TensorInfo

from . import argmax as am
from . import attention as att
from . import gemm_int8 as g8
from . import matvec as mv
from . import ops
from .jit import SIM
from .launch import Arena, LaunchQueue, Step, Tensor, pinned_zeros, upload
from .quants import gpu_format, int8_codes, repack

_MODES = {None: mv.PLAIN, "rms": mv.RMS, "swiglu": mv.SWIGLU, "geglu": mv.GEGLU}
_F0, _F1 = np.float32(0.0), np.float32(1.0)


def _f32(x: float, _cache: dict = {}) -> np.float32:  # noqa: B006 (a cache by design)
    """np.float32(x), one object per value: a replayed step's arguments then compare by identity."""
    v = _cache.get(x)
    if v is None:
        v = _cache[x] = np.float32(x)
    return v


class _Decode:
    """The decode GEMV last queued (one token), kept open so the next op can join it: another product of the
    same input (q, k, v), the gate (SwiGLU / GeGLU of the pair gate, up), or a residual add."""

    __slots__ = ("bs", "glu", "idx", "inp", "items", "qout", "res", "ws", "x", "ys", "z")

    def __init__(self, x, inp, w, y, bias, items):
        self.x, self.inp, self.ws, self.ys, self.bs = x, inp, [w], [y], [bias]
        self.items, self.idx = items, len(items)  # the queue's list (a flush starts a new one) and its index
        self.glu, self.res, self.z = 0, None, None
        self.qout = None  # gated: (words, scales, counts) where the launch leaves h quantized for the next product

    def item(self, be):
        mode, src, x2, nw, eps = self.inp
        ws, ys, bs, dummy = self.ws, self.ys, self.bs, be._dummy
        n = len(ws)
        w3 = ws + [ws[0]] * (3 - n)
        y3 = [y.buf for y in ys] + [ys[0].buf] * (3 - len(ys))
        b3 = [b.buf if b is not None else dummy for b in bs] + [dummy] * (3 - n)
        flags = sum(f for f, b in zip((mv.HAS_BIAS, mv.HAS_BIAS2, mv.HAS_BIAS3), bs) if b is not None)
        if self.res is not None:
            flags |= mv.HAS_RES
        ns = [w.shape[0] for w in ws] + [0] * (3 - n)
        k = ws[0].shape[1]
        oq, od, cnt = self.qout or (be._dummy_i32, dummy, be._dummy_i32)
        kern = mv.gemv1_kernel(tuple(w.type for w in ws), mode, self.glu, k, be.int8_decode)
        grid, block, split = mv.gemv1_launch(ns[0] if self.glu else sum(ns), k, be.n_sm,
                                             rows_per_warp=getattr(kern, "_pq_rows_per_warp", 1))
        args = (*y3, w3[0].q, w3[0].d, w3[1].q, w3[1].d, w3[2].q, w3[2].d, *b3, src.buf, x2, nw, eps,
                self.res.buf if self.res is not None else dummy, self.z.buf if self.z is not None else dummy,
                flags, *ns, k, oq, od, cnt, split)
        return (kern, grid, block, args)


class CudaWeight:
    """A matrix (N, K) on the device: repacked blocks for the GEMV, int8 codes for the GEMM (made on first use)."""

    def __init__(self, t: TensorInfo):
        if len(t.shape) != 2:
            raise PyquantError(f"{t.name}: the CUDA backend takes 2-D weights, not shape {t.shape}")
        gpu_format(t.type)
        self.name, self.type, self.shape, self.info = t.name, t.type, tuple(t.shape), t
        q, d = repack(t.data, t.type, self.shape)
        self.q, self.d = upload(q), upload(d)
        self._codes = None

    def codes(self):
        """(words int32 (N, K/4), scales (N, K/16), mins (N, K/32) or None, per16) or None (float rows)."""
        if self._codes is None:
            c = int8_codes(self.info.data, self.type, self.shape)
            if c is None:
                self._codes = False
            else:
                codes, scales, mins = c
                words = upload(np.ascontiguousarray(codes).view(np.int32))
                per16 = bool(np.any(scales[:, 0::2] != scales[:, 1::2]))
                self._codes = (words, upload(scales), None if mins is None else upload(mins),
                               per16)
        return self._codes or None


class CudaKVCache:
    """Per-layer K and V rows (n_ctx, G, Dh) in one cache type (f32, f16, q8_0, q4_0), stored flat."""

    def __init__(self, n_layer, n_ctx, n_head_kv, head_dim_k, head_dim_v, cache_type):
        self.n_ctx, self.cache_type, self.kind = n_ctx, cache_type, att.CACHE_TYPES[cache_type]
        self.n_head_kv, self.head_dim_k, self.head_dim_v = n_head_kv, head_dim_k, head_dim_v
        self.k = [att.cache_arrays(self.kind, n_ctx * n_head_kv * head_dim_k) for _ in range(n_layer)]
        self.v = [att.cache_arrays(self.kind, n_ctx * n_head_kv * head_dim_v) for _ in range(n_layer)]


class CudaBackend:
    name = "cuda"

    def __init__(self, threads: int | None = None, cache_type: str = "f16", int8_prefill: bool = True,
                 gemv_tokens: int = 8, graphs: bool = True, int8_decode: bool = True):
        if cache_type not in att.CACHE_TYPES:
            raise PyquantError(f"the CUDA backend keeps {', '.join(att.CACHE_TYPES)} KV caches, not {cache_type!r}")
        self.cache_type = cache_type
        self.int8_prefill = int8_prefill
        self.int8_decode = int8_decode
        self.gemv_tokens = max(1, min(int(gemv_tokens), 8))
        self.queue = LaunchQueue(graphs)
        self.arena = Arena()
        self._dummy = upload(np.zeros(1, np.float32))
        self._dummy2 = upload(np.zeros((1, 1), np.float32))
        self._dummy_i32 = upload(np.zeros(1, np.int32))
        self._unit_counts: dict = {}  # zeroed counters of the gated GEMV's quantized output, by units
        self._rope: dict = {}
        self._att1: dict = {}  # decode attention's split scratch by (heads, value dims)
        self._n_ctx = 0
        self._step: Step | None = None  # the last decode step recorded, see replay_step
        self._step_params = pinned_zeros(2, np.int32)
        self._last_out = None  # (flush number, flat buffer, host array) of the last to_host that launched work
        self._rows_limit = 0
        self._ctx_limit = None  # the smallest n_ctx of the caches the pass being queued attends to
        self._argmax = None  # argmax_step's scratch, made at the first replay_greedy
        self._ring_zero = pinned_zeros(1, np.int32)
        self.n_replays = 0
        self.n_greedy_steps = 0  # decode steps run by replay_greedy
        self.n_sm = 1 if SIM else cuda.get_current_device().MULTIPROCESSOR_COUNT
        self._dec: _Decode | None = None  # the decode GEMV that the next op may join
        self._q8_inputs: dict = {}  # this pass's int8-quantized GEMM inputs by buffer: (buffer, shape, arrays)

    # --- plumbing ------------------------------------------------------------------------------------
    def _out(self, shape) -> Tensor:
        y = Tensor(None, shape)
        y.buf = self.arena.alloc(y.size)
        return y

    def _ready(self, x: Tensor) -> Tensor:
        """x with its buffer computed (a pending fused producer is launched on its own)."""
        p = x.pending
        if p is None:
            return x
        if p[0] == "rope":
            _, src, cos, sin, n_rot, neox = p
            src = self._ready(src)
            t, h, d = src.shape
            self.queue.add(ops.rope, *ops.grid1(t * h * (d // 2)), x.buf, src.buf, cos, sin, self.queue.params_dev,
                           t, h, d, n_rot, neox)
        elif p[0] == "rms":
            _, src, w, eps = p
            src = self._ready(src)
            d = src.shape[-1]
            self.queue.add(ops.rms_norm, src.size // d, 128, x.buf, src.buf, w.buf, _f32(eps), d)
        else:
            kern = ops.swiglu if p[0] == "swiglu" else ops.geglu
            g, u = self._ready(p[1]), self._ready(p[2])
            self.queue.add(kern, *ops.grid1(x.size), x.buf, g.buf, u.buf, x.size)
        x.pending = None
        return x

    def flush(self) -> None:
        self.queue.flush()

    def replay_step(self, key, ids: np.ndarray, pos0: int, build):
        """The host result of `build()`, a forward pass of the single token ids[0] at pos0 that ends in one
        to_host. The first time, build() runs and, if its launches went out in one flush, they are recorded
        under `key` (the caller's model and cache); the next call with the same key skips build(): it writes
        the token and position into the parameter block and replays the recorded launches (one CUDA graph)."""
        s, q = self._step, self.queue
        if s is not None and s.key == key and len(ids) == 1 and not q.items:
            return self._replay(s, int(ids[0]), pos0)
        n0 = q.n_flushes
        self._last_out = None
        out = build()
        lo = self._last_out
        if (q.n_flushes == n0 + 1 and lo is not None and lo[0] == n0 + 1 and q.last_n_params == 2
                and isinstance(out, np.ndarray) and out.size == lo[2].size and np.may_share_memory(out, lo[2])):
            self._step = Step(key, q.last_sig, q.params_dev, lo[1], out.shape, self._rows_limit, self._ctx_limit)
        return out

    def replay_greedy(self, key, tok: int, pos0: int, n: int) -> np.ndarray | None:
        """The n greedy tokens after feeding `tok` at pos0 through the decode step recorded under `key` (see
        replay_step), or None when none is (the caller then runs forward steps). Each run of the step is
        followed by argmax.argmax_step, which writes the chosen token and the next position into the parameter
        block for the next run: n runs go out back to back (one graph launch each), then one copy of the tokens
        and one synchronize. The cache then holds K/V of the n tokens fed (tok and the first n - 1 chosen) at
        pos0 .. pos0 + n - 1, as n forward calls would leave it."""
        s, q = self._step, self.queue
        if s is None or s.key != key or q.items or s.n_ctx is None or s.out.size > s.n_rows:
            return None  # (an argmax over more logits than embedding rows could choose an id get_rows refuses)
        tok, pos0, n = int(tok), int(pos0), int(n)
        if not 0 <= tok < s.n_rows:
            raise PyquantError(f"token id out of range [0, {s.n_rows})")
        if n < 1 or pos0 < 0 or pos0 + n > s.n_ctx:
            raise PyquantError(f"greedy decoding of {n} tokens at position {pos0} does not fit n_ctx {s.n_ctx}")
        if s.greedy is None:
            if self._argmax is None:
                self._argmax = am.scratch()
            ring = cuda.device_array(1 + s.n_ctx, np.int32)  # a count, then up to n_ctx tokens
            items = s.items + [(am.argmax_step, *am.grid(s.out.size), (s.out, s.out.size, s.params, ring,
                                                                       *self._argmax))]
            host = pinned_zeros(ring.size, np.int32)
            s.greedy = (items, q.capture(items), ring, host)
        items, graph, ring, host = s.greedy
        p = self._step_params
        p[0], p[1] = pos0, tok
        s.params.copy_to_device(p, stream=q.stream)
        ring[:1].copy_to_device(self._ring_zero, stream=q.stream)
        for _ in range(n):  # no host synchronization in between: the argmax feeds the next run on the device
            if graph is not None:
                graph.launch(q.core_stream)
            else:
                q.run_eager(items)
        q.n_graph_launches += n if graph is not None else 0
        q.n_launches += n * len(items)
        ring[: 1 + n].copy_to_host(host[: 1 + n], stream=q.stream)
        q.synchronize()
        self.n_greedy_steps += n
        if host[0] != n:
            raise PyquantError(f"device argmax counted {host[0]} tokens for {n} steps")
        return host[1 : 1 + n].copy()

    def _replay(self, s: Step, tok: int, pos0: int) -> np.ndarray:
        if not 0 <= tok < s.n_rows:
            raise PyquantError(f"token id out of range [0, {s.n_rows})")
        q = self.queue
        p = self._step_params
        p[0], p[1] = pos0, tok
        s.params.copy_to_device(p, stream=q.stream)
        if s.graph is None and q.graphs:
            s.graph = q.capture(s.items)
        if s.graph is not None:
            s.graph.launch(q.core_stream)
            q.n_graph_launches += 1
        else:
            q.run_eager(s.items)
        q.n_launches += len(s.items)
        if s.host is None:
            s.host = pinned_zeros(s.out.size, np.float32)
        s.out.copy_to_host(s.host, stream=q.stream)
        q.synchronize()
        self.n_replays += 1
        return s.host.reshape(s.shape).copy()

    def synchronize(self) -> None:
        self.queue.flush()
        self.queue.synchronize()

    # --- weights -------------------------------------------------------------------------------------
    def weight(self, t: TensorInfo) -> CudaWeight:
        return CudaWeight(t)

    # --- ops -----------------------------------------------------------------------------------------
    def get_rows(self, w: CudaWeight, ids: np.ndarray) -> Tensor:  # (T, D)
        if not self.queue.items:
            self.arena.reset()  # a new forward pass: the last one's activations are done with
            self._ctx_limit = None
            self._q8_inputs = {}
        ids = np.asarray(ids, np.int64)
        self._rows_limit = w.shape[0]
        lo, hi = (int(ids[0]), int(ids[0])) if len(ids) == 1 else (ids.min(), ids.max()) if len(ids) else (0, 0)
        if lo < 0 or hi >= w.shape[0]:
            raise PyquantError(f"token id out of range [0, {w.shape[0]})")
        at = self.queue.put_ids(ids)
        t, k = len(ids), w.shape[1]
        y = self._out((t, k))
        if t:
            self.queue.add(mv.get_rows_kernel(w.type), *mv.rows_grid(t, k), y.buf, w.q, w.d,
                           self.queue.params_dev, at, _F1, k)
        return y

    def linear(self, x: Tensor, w: CudaWeight, bias: Tensor | None = None) -> Tensor:
        n, k = w.shape
        if x.shape[-1] != k:
            raise PyquantError(f"{w.name}: input has {x.shape[-1]} columns, the weight {k}")
        t = x.size // k
        y = self._out(x.shape[:-1] + (n,))
        flags = mv.HAS_BIAS if bias is not None else 0
        b = bias.buf if bias is not None else self._dummy
        if t == 0:
            return y
        if t == 1 and k <= mv.STAGE:
            return self._linear1(x, w, bias, y)
        if t <= self.gemv_tokens:
            mode, src, x2, nw, eps = self._gemv_input(x, k)
            kern = mv.gemv_kernel(w.type, mode, t)
            self.queue.add(kern, *mv.gemv_grid(n), y.buf, y.buf, w.q, w.d, src.buf, x2, nw, eps, b,
                           self._dummy, flags, n, k)
            return y
        x = self._ready(x)
        codes = w.codes() if self.int8_prefill else None
        if codes is None:
            self.queue.add(mv.gemm_f32_kernel(w.type), *mv.gemm_grid(t, n), y.buf, w.q, w.d, x.buf, b,
                           self._dummy, flags, t, n, k)
            return y
        words, scales, mins, per16 = codes
        hit = self._q8_inputs.get(id(x.buf))
        if hit is not None and hit[0] is x.buf and hit[1] == (t, k):  # q, k, v (gate, up) read one input
            aq2, sa2, asum2 = hit[2]
        else:
            aq2 = self.arena.alloc(t * k // 4, np.int32, (t, k // 4))
            sa2 = self.arena.alloc(t * k // 32, shape=(t, k // 32))
            asum2 = self.arena.alloc(t * k // 32, shape=(t, k // 32))
            self.queue.add(g8.quantize_q8, *ops.grid1(t * k // 32, 128), aq2, sa2, asum2, x.buf, t, k)
            self._q8_inputs[id(x.buf)] = (x.buf, (t, k), (aq2, sa2, asum2))
        tile = g8.gemm_q8_tile(t, n, self.n_sm)
        kern = g8.gemm_q8_kernel(per16, mins is not None, tile)
        self.queue.add(kern, *g8.gemm_grid(t, n, tile), y.buf, aq2, sa2, asum2, words, scales,
                       mins if mins is not None else scales, b, self._dummy, flags, t, n, k // 4)
        return y

    def _gemv_input(self, x: Tensor, k: int):
        """(mode, source, x2, norm weight, eps) of a GEMV reading x: its pending RMSNorm or gate fused in."""
        p = x.pending
        mode = _MODES[p[0] if p else None]
        if mode == mv.RMS and p[1].shape[-1] == k and p[1].pending is None:
            return mode, p[1], self._dummy, p[2].buf, _f32(p[3])
        if mode in (mv.SWIGLU, mv.GEGLU) and p[1].pending is None and p[2].pending is None:
            return mode, p[1], p[2].buf, self._dummy, _F0
        return mv.PLAIN, self._ready(x), self._dummy, self._dummy, _F0

    def _q8_input(self, d: _Decode | None, x: Tensor, w: CudaWeight):
        """Input mode Q8 for a one-token product of x, the output h of d, the gated decode GEMV queued last (gate,
        up, SwiGLU; then ffn_down): that launch is made to leave h quantized as this product's int8 units read it,
        so this one stages nothing. None where either is not on int8 activations."""
        if not (d is not None and d.glu and d.ys[2].buf is x.buf and x.size % mv.UNIT == 0 and self.int8_decode
                and all(v.type in mv.INT_UNITS for v in d.ws + [w])):
            return None
        if d.qout is None:
            units = x.size // mv.UNIT
            cnt = self._unit_counts.get(units)
            if cnt is None:
                cnt = self._unit_counts[units] = upload(np.zeros(units, np.int32))
            d.qout = (self.arena.alloc(units * mv.QW, np.int32), self.arena.alloc(units), cnt)
            self.queue.items[-1] = d.item(self)
        return mv.Q8, _Buf(d.qout[0]), d.qout[1], self._dummy, _F0

    def _joinable(self) -> _Decode | None:
        d, items = self._dec, self.queue.items
        return d if d is not None and d.items is items and d.idx == len(items) - 1 else None

    def _linear1(self, x: Tensor, w: CudaWeight, bias: Tensor | None, y: Tensor) -> Tensor:
        """One token: a decode GEMV, joined to the last one when it reads the same input (q, k, v; gate, up)."""
        d = self._joinable()
        items = self.queue.items
        if (d is not None and d.x is x and not d.glu and d.res is None and len(d.ws) < 3
                and (d.inp[0] != mv.Q8 or w.type in mv.INT_UNITS)):
            d.ws.append(w)
            d.ys.append(y)
            d.bs.append(bias)
            items[-1] = d.item(self)
            return y
        inp = self._q8_input(d, x, w) or self._gemv_input(x, w.shape[1])
        d = self._dec = _Decode(x, inp, w, y, bias, items)
        items.append(d.item(self))
        return y

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return Tensor(self.arena.alloc(x.size), x.shape, ("rms", x, weight, float(eps)))

    def rope(self, x: Tensor, positions: np.ndarray, n_rot: int, base: float, neox: bool,
             freq_scale: float = 1.0) -> Tensor:
        """Left pending: attention turns q and k as it stores them (attention.rope_store, attend1); anything else
        that reads the result launches the rope kernel. A per-head RMS norm of x (gemma3's q/k norms) stays
        pending too: attend1 applies it."""
        p = x.pending
        if not (p is not None and p[0] == "rms" and x.ndim == 3 and p[2].size == x.shape[2]):
            x = self._ready(x)
        t = x.shape[0]
        positions = np.asarray(positions)
        if t == 0:
            return x
        p0 = int(positions[0])
        if int(positions[-1]) != p0 + t - 1:
            raise PyquantError("the CUDA backend rotates consecutive positions only")
        cos, sin = self._rope_tables(n_rot, base, freq_scale, p0 + t)
        self.queue.set_pos0(p0)
        return Tensor(self.arena.alloc(x.size), x.shape, ("rope", x, cos, sin, int(n_rot), bool(neox)))

    def _rope_tables(self, n_rot, base, freq_scale, need):
        key = (n_rot, float(base), float(freq_scale))
        tab = self._rope.get(key)
        if tab is None or tab[0].shape[0] < need:
            n = max(need, self._n_ctx, 4096 if tab is None else 2 * tab[0].shape[0])
            cos, sin = rope_cos_sin(np.arange(n, dtype=np.int64), n_rot, base, freq_scale)
            tab = (upload(np.ascontiguousarray(cos)), upload(np.ascontiguousarray(sin)))
            self._rope[key] = tab
        return tab

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        return self._gate(gate, up, "swiglu", mv.SWIGLU)

    def geglu(self, gate: Tensor, up: Tensor) -> Tensor:
        return self._gate(gate, up, "geglu", mv.GEGLU)

    def _gate(self, gate: Tensor, up: Tensor, name: str, glu: int) -> Tensor:
        """act(gate) * up: computed by the decode GEMV that made gate and up, when one launch made both;
        else left pending, to be fused into the product that reads it."""
        d = self._joinable()
        if (d is not None and len(d.ws) == 2 and not d.glu and d.res is None and d.ys[0].buf is gate.buf
                and d.ys[1].buf is up.buf and d.ws[0].shape == d.ws[1].shape and gate.size == d.ws[0].shape[0]):
            h = self._out(gate.shape)
            d.glu = glu
            d.ys.append(h)
            self.queue.items[-1] = d.item(self)
            return h
        return Tensor(self.arena.alloc(gate.size), gate.shape, (name, gate, up))

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        items = self.queue.items
        d = self._joinable()
        for res, lin in ((a, b), (b, a)):  # fold into the decode GEMV that made one operand, if it was the last
            if (d is not None and len(d.ws) == 1 and not d.glu and d.res is None and d.ys[0].buf is lin.buf
                    and lin.pending is None and res.pending is None and lin.shape == res.shape):
                d.res, d.z = res, self._out(lin.shape)
                items[-1] = d.item(self)
                return d.z
        for res, nrm in ((a, b), (b, a)):  # a pending RMSNorm (a post-norm) and the add after it: one launch
            p = nrm.pending
            if (p is not None and p[0] == "rms" and res.pending is None and p[1].pending is None
                    and res.shape == nrm.shape and p[1].shape[-1] == nrm.shape[-1]):
                d = nrm.shape[-1]
                y = self._out(res.shape)
                self.queue.add(ops.rms_add, max(1, res.size // d), 128, y.buf, p[1].buf, p[2].buf, res.buf,
                               _f32(p[3]), d)
                return y
        for res, lin in ((a, b), (b, a)):  # fold into the product that made one operand, if it was the last
            if lin.pending is None and res.pending is None and items and lin.shape == res.shape:
                kern, grid, block, args = items[-1]
                if args[0] is lin.buf and _is_gemv(kern) and not args[10] & mv.HAS_RES:
                    z = self._out(lin.shape)  # (y, z, q, d, x, x2, nw, eps, bias, res, flags, N, K)
                    args = args[:1] + (z.buf,) + args[2:9] + (res.buf, args[10] | mv.HAS_RES) + args[11:]
                    items[-1] = (kern, grid, block, args)
                    return z
        a, b = self._ready(a), self._ready(b)
        y = self._out(a.shape)
        self.queue.add(ops.add, *ops.grid1(y.size), y.buf, a.buf, b.buf, y.size)
        return y

    def scale(self, x: Tensor, s: float) -> Tensor:
        x = self._ready(x)
        y = self._out(x.shape)
        self.queue.add(ops.scale, *ops.grid1(y.size), y.buf, x.buf, _f32(float(s)), y.size)
        return y

    def compile_counts(self) -> None:
        return None  # numba-cuda compiles at the first launch and keeps nothing on disk

    def to_host(self, x) -> np.ndarray:
        if not isinstance(x, Tensor):
            return np.asarray(x)
        x = self._ready(x)
        flushed = bool(self.queue.items)
        self.queue.flush()
        out = np.empty(x.size, np.float32)
        if flushed:  # what replay_step records: the launches of one flush and the tensor they made
            self._last_out = (self.queue.n_flushes, x.buf[: x.size], out)
        if x.size:
            x.buf[: x.size].copy_to_host(out, stream=self.queue.stream)
            self.queue.synchronize()
        return out.reshape(x.shape)

    def from_host(self, x: np.ndarray) -> Tensor:
        x = np.ascontiguousarray(x, np.float32)
        return Tensor(upload(x.reshape(-1)), x.shape)

    # --- attention -----------------------------------------------------------------------------------
    def new_cache(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim_k: int, head_dim_v: int) -> CudaKVCache:
        if max(head_dim_k, head_dim_v) > att.MAX_HEAD_DIM or head_dim_k % 32 or head_dim_v % 32:
            raise PyquantError(f"the CUDA backend takes head sizes that are multiples of 32 up to "
                               f"{att.MAX_HEAD_DIM}, not {head_dim_k}/{head_dim_v}")
        self._n_ctx = max(self._n_ctx, n_ctx)
        return CudaKVCache(n_layer, n_ctx, n_head_kv, head_dim_k, head_dim_v, self.cache_type)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, cache: CudaKVCache, layer: int, pos0: int,
                  scale: float, window: int = 0) -> Tensor:
        qp, kp = q.pending, k.pending
        rot = (qp is not None and kp is not None and qp[0] == kp[0] == "rope" and qp[2] is kp[2]
               and qp[4:] == kp[4:])
        t, n_head, dk = q.shape
        qnorm = knorm = None
        if rot:  # q and k turned where they are stored (rope_store, attend1): q written once, k only in the cache
            qsrc, ksrc, cos, sin, n_rot, neox = qp[1], kp[1], qp[2], qp[3], qp[4], qp[5]
            qnorm, knorm = qsrc.pending, ksrc.pending
            if not (t == 1 and qnorm is not None and knorm is not None and qnorm[0] == knorm[0] == "rms"
                    and qnorm[3] == knorm[3] and qnorm[1].pending is None and knorm[1].pending is None):
                qnorm = knorm = None  # attend1 normalizes a decode token's q and k; anything else is normalized first
                qsrc, ksrc = self._ready(qsrc), self._ready(ksrc)
        else:
            q, k = self._ready(q), self._ready(k)
            qsrc, ksrc, cos, sin, n_rot, neox = q, k, self._dummy2, self._dummy2, 0, False
        v = self._ready(v)
        g, dv = v.shape[1], v.shape[2]
        if pos0 + t > cache.n_ctx:
            raise PyquantError(f"context full: {pos0 + t} tokens exceed n_ctx {cache.n_ctx}")
        self.queue.set_pos0(pos0)
        self._ctx_limit = cache.n_ctx if self._ctx_limit is None else min(self._ctx_limit, cache.n_ctx)
        (kc, ks), (vc, vs) = cache.k[layer], cache.v[layer]
        pd = self.queue.params_dev
        y = self._out((t, n_head * dv))
        if t == 1:  # attend1 turns q and k and stores k, v itself: no rope_store launch
            scratch = self._att1.get((n_head, dv))
            if scratch is None:
                scratch = self._att1[(n_head, dv)] = att.attend1_scratch(n_head, dv)
            if qnorm is not None:  # the raw projections and the norms' weights
                qsrc, ksrc, norm = qnorm[1], knorm[1], (qnorm[2].buf, knorm[2].buf, _f32(qnorm[3]), True)
            else:
                norm = (self._dummy, self._dummy, _f32(0.0), False)
            self.queue.add(att.attend1_kernel(cache.kind, dk, dv), (n_head, att.SPLITS), att.THREADS, y.buf,
                           qsrc.buf, kc, ks, vc, vs, pd, _f32(float(scale)), int(window), n_head, g, *scratch,
                           ksrc.buf, v.buf, cos, sin, n_rot, neox, rot, *norm)
            return y
        n_thr = (t * n_head * dk if rot else 0) + t * g * (dk + dv) // att.kv_per_thread(cache.kind)
        self.queue.add(att.rope_store_kernel(cache.kind), *ops.grid1(n_thr, 128), q.buf, qsrc.buf, kc, ks,
                       ksrc.buf, vc, vs, v.buf, cos, sin, pd, t, n_head, g, dk, dv, n_rot, neox, rot)
        q.pending = None  # rope_store wrote it (attend1 reads qsrc: q stays pending there)
        self.queue.add(att.attend_kernel(cache.kind, dk, dv), *att.attend_grid(n_head, g, t, dk, dv), y.buf,
                       q.buf, kc, ks, vc, vs, pd, _f32(float(scale)), int(window), n_head, g, t)
        return y


class _Buf:
    """A device buffer where a GEMV input's source Tensor goes (the quantized words of input mode Q8)."""

    __slots__ = ("buf",)

    def __init__(self, buf):
        self.buf = buf


def _is_gemv(kern) -> bool:
    return getattr(kern, "_pq_gemv", False)
