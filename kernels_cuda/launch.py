"""Launch machinery: the device tensor type, the activation arena, and the launch queue that the backend
flushes eagerly or as a replayed CUDA graph.

Ops do not launch when called: they append (kernel, grid, block, args) to a queue and return tensors whose
buffers come from an arena that restarts with every forward pass, so one decode step queues the same
launches, with the same buffers, as the last. `flush` (called by `to_host`) copies the small parameter block
(token ids, first position) to the device and then runs the queue: eagerly the first time a sequence is seen,
captured into a CUDA graph the second time (numba-cuda launches into a cuda.core GraphBuilder), and replayed
as one graph launch while it repeats. Kernels read positions and ids from the parameter block, never from
their arguments, so a graph stays valid from token to token.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from numba import cuda

from .jit import SIM

log = logging.getLogger(__name__)


class Tensor:
    """A float32 activation on the device: a flat buffer and a shape (numpy order)."""

    __slots__ = ("__weakref__", "buf", "pending", "shape", "size")

    def __init__(self, buf, shape, pending=None):
        self.buf = buf
        self.shape = shape = tuple(map(int, shape))
        self.size = _prod(shape)
        self.pending = pending  # a fused producer not yet launched: ("rms", x, w, eps) | ("swiglu"/"geglu", g, u)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return np.dtype(np.float32)

    def reshape(self, *shape) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], tuple):
            shape = shape[0]
        shape = list(shape)
        if -1 in shape:
            i = shape.index(-1)
            shape[i] = 1
            shape[i] = self.size // _prod(shape)
        if _prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {tuple(shape)}")
        return Tensor(self.buf, shape, self.pending)

    def __getitem__(self, key) -> Tensor:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("device tensors take a plain slice over their first axis")
        start, stop, _ = key.indices(self.shape[0])
        if start == 0 and stop == self.shape[0]:
            return self
        if self.pending is not None:
            raise ValueError("slice of an unmaterialized tensor")
        row = self.size // self.shape[0]
        return Tensor(_slice(self.buf, start * row, stop * row), (max(stop - start, 0),) + self.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, device)"


def upload(a: np.ndarray):
    """cuda.to_device(a), waited for: the copy goes on the default stream, which the queue's non-blocking stream
    does not wait for, and a pageable copy may still be in flight when to_device returns."""
    d = cuda.to_device(a)
    cuda.synchronize()
    return d


def pinned_zeros(n: int, dtype=np.int32) -> np.ndarray:
    """n zeros in page-locked host memory (np.zeros in the simulator). cuda.pinned_array hands its memory out as
    it finds it, e.g. a just-freed buffer of this process: the token ring's zero was once another model's
    logit, read back as the count."""
    if SIM:
        return np.zeros(n, dtype)
    a = cuda.pinned_array(n, dtype)
    a[:] = 0
    return a


_SLICES: dict = {}


def _slice(buf, start: int, stop: int):
    """buf[start:stop], the same view object for the same buffer and bounds: a queued launch compares its
    arguments by identity (device arrays have no value equality), so a fresh view in every pass would keep a
    repeated pass from matching the last one and from replaying as a graph."""
    key = (id(buf), start, stop)
    hit = _SLICES.get(key)
    if hit is not None and hit[0] is buf:
        return hit[1]
    if len(_SLICES) > 4096:
        _SLICES.clear()
    view = buf[start:stop]
    _SLICES[key] = (buf, view)
    return view


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Arena:
    """Bump allocator for activations; `reset` starts over and, when the last pass outgrew the buffer,
    replaces it by one large enough. The same (offset, size) gives the same buffer object back."""

    ALIGN = 64  # floats

    def __init__(self, floats: int = 1 << 20):
        self.buf = cuda.device_array(floats, np.float32)
        self.top = 0
        self.high = 0
        self.views: dict = {}

    def alloc(self, n: int, dtype=np.float32, shape=None):
        """n values of dtype, flat or viewed as `shape`; the same view object as in the last pass (see _slice)."""
        start = self.top
        key = (start, n, dtype, shape)
        hit = self.views.get(key)  # the common case: the same allocation as in the last pass
        if hit is not None:
            view, self.top = hit
            self.high = max(self.high, self.top)
            return view
        n_f = -(-max(n, 1) * np.dtype(dtype).itemsize // 4)
        top = start + -(-n_f // self.ALIGN) * self.ALIGN
        self.top = top
        self.high = max(self.high, top)
        if top > self.buf.size:  # over: a buffer of its own until the next reset grows the arena
            return cuda.device_array(shape or n, dtype)
        view = self.buf[start : start + n_f]
        if np.dtype(dtype) != np.float32:
            view = view.view(dtype)[:n]
        if shape is not None:
            view = view.reshape(shape)
        self.views[key] = (view, top)
        return view

    def reset(self):
        if self.high > self.buf.size:
            self.buf = cuda.device_array(int(self.high * 1.25), np.float32)
            self.views = {}
        self.top = 0
        self.high = 0


class Step:
    """One recorded forward pass of a single token (a decode step): its launches, which read the token id and
    the position from parameter slots 1 and 0, and the tensor its caller brought back. `CudaBackend.replay_step`
    runs it again for another token and position: a 8-byte parameter copy, one graph launch, the output copy.
    `CudaBackend.replay_greedy` runs it with the device argmax after it (`greedy`, made at its first use)."""

    __slots__ = ("graph", "greedy", "host", "items", "key", "n_ctx", "n_rows", "out", "params", "shape")

    def __init__(self, key, items, params_dev, out, shape, n_rows, n_ctx):
        self.key, self.items, self.out, self.shape, self.n_rows = key, items, out, shape, n_rows
        self.n_ctx = n_ctx  # positions its KV caches hold (the smallest of them)
        self.params = params_dev[:2]
        self.graph = None
        self.host = None  # pinned, made at the first replay (a step that is never replayed allocates nothing)
        self.greedy = None  # (items + argmax, their graph or None, token ring, its pinned host copy)


def _core():
    try:
        from cuda.core import Device
    except ImportError:
        from cuda.core.experimental import Device
    return Device


class LaunchQueue:
    """Queued launches, a parameter block, and the CUDA graph of the last repeated sequence."""

    def __init__(self, graphs: bool = True):
        self.items: list = []
        self.graphs = graphs and not SIM and os.environ.get("PYQUANT_CUDA_GRAPHS", "1") != "0"
        self.graph = None
        self.graph_sig = None
        self.last_sig = None
        self.n_launches = 0  # kernels run (eagerly or inside graphs)
        self.n_graph_launches = 0
        self.n_flushes = 0
        self.last_n_params = 0  # parameter slots the last flush used (1 + token ids)
        self.core_stream = None
        if self.graphs:
            try:
                dev = _core()()
                dev.set_current()
                self.device = dev
                self.core_stream = dev.create_stream()
                self.stream = cuda.external_stream(int(self.core_stream.handle))
            except Exception as e:  # no cuda.core: plain launches
                log.warning("CUDA graphs off: %s", e)
                self.graphs = False
        if not self.graphs:
            self.stream = cuda.stream()
        self.params_host = self._host_array(1024)
        self.params_dev = cuda.to_device(self.params_host, stream=self.stream)
        self.n_params = 1  # slot 0: first position
        self.pos0 = None

    def _host_array(self, n):
        return pinned_zeros(n, np.int32)

    # --- parameters ---------------------------------------------------------------------------------
    def set_pos0(self, p: int) -> None:
        if self.pos0 is not None and p != self.pos0:
            self.flush()
        self.params_host[0] = p
        self.pos0 = p

    def put_ids(self, ids: np.ndarray) -> int:
        n = len(ids)
        if self.n_params + n > self.params_host.size:
            self.flush()
            if 1 + n > self.params_host.size:
                self.params_host = self._host_array(max(2 * self.params_host.size, 1 + n))
                self.params_dev = cuda.device_array(self.params_host.size, np.int32)
        at = self.n_params
        self.params_host[at : at + n] = ids
        self.n_params += n
        return at

    # --- launches -----------------------------------------------------------------------------------
    def add(self, kern, grid, block, *args) -> int:
        self.items.append((kern, grid, block, args))
        return len(self.items) - 1

    def flush(self) -> None:
        items = self.items
        if not items:
            return
        self.params_dev.copy_to_device(self.params_host, stream=self.stream)
        if self.graphs and self.graph is not None and items == self.graph_sig:
            self.graph.launch(self.core_stream)
            self.n_graph_launches += 1
        elif self.graphs and items == self.last_sig and self._capture(items):
            self.graph_sig = items
            self.graph.launch(self.core_stream)
            self.n_graph_launches += 1
        else:
            self.run_eager(items)
        self.n_launches += len(items)
        self.n_flushes += 1
        self.last_sig = items
        self.last_n_params = self.n_params
        self.items = []
        self.n_params = 1
        self.pos0 = None

    def run_eager(self, items) -> None:
        for kern, grid, block, args in items:
            kern[grid, block, self.stream](*args)

    def capture(self, items):
        """items recorded as a CUDA graph, or None (graphs off, or the capture failed: then graphs go off)."""
        if not self.graphs:
            return None
        gb = None
        try:
            gb = self.device.create_graph_builder()
            try:
                gb.begin_building(mode="relaxed")
            except TypeError:
                gb.begin_building()
            for kern, grid, block, args in items:
                kern[grid, block, gb](*args)
            return gb.end_building().complete()
        except Exception as e:
            log.warning("CUDA graph capture failed, launching eagerly from now on: %s: %s", type(e).__name__, e)
            self.graphs = False
            self.graph = self.graph_sig = None
            return None

    def _capture(self, items) -> bool:
        self.graph = self.capture(items)
        return self.graph is not None

    def synchronize(self) -> None:
        self.stream.synchronize()
