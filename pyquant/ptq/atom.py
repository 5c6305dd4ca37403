"""Atom (Zhao et al. 2024, "Atom: Low-Bit Quantization for Efficient and Accurate LLM Serving"), W4A4 + KV4:

- per linear input, channels sorted by calibration max|x| so the n_outliers (128) largest come last; the
  reorder is applied to the weights' columns offline and, at run time, by the op that writes the
  activations (a norm or the previous kernel's quantization step; pyquant's reference gathers x[:, perm]);
- outlier channels: int8 weights (one scale per row) x int8 per-token activations;
- the rest: int4 weights, symmetric, groups of 128 with clip ratio 0.85, chosen by GPTQ over the reordered
  columns (the int8 outlier block last, in the same GPTQ pass); activations int4 per token in groups of 128,
  quantized dynamically with clip ratio 0.9;
- the KV cache stored as asymmetric 4-bit codes per token and head (pyquant.kv.bits); K after a static
  per-(head, channel) shift and scale calibrated here (`kv_k_stats`; runtime.KVQuant says why and what it
  measured): shift = the mean of post-RoPE K over the calibration tokens, scale = max|K - shift|^k_smooth
  (0.75), each window's first token (the attention sink, far off the others) left out of both.
With n_outliers = 0, no reorder and RTN weights it is plain W4A4 RTN, the baseline Atom improves on.
"""

from __future__ import annotations

import numpy as np
import torch

from pyquant.errors import PyquantError

from .driver import _Stop
from .gptq import GPTQ
from .grids import AbsMax, rtn
from .runtime import W4A4, GroupInt


class AtomMethod:
    name = "atom"

    def __init__(
        self,
        n_outliers: int = 128,
        group: int = 128,
        w_clip: float = 0.85,
        a_clip: float = 0.9,
        use_gptq: bool = True,
        reorder: bool = True,
        damp: float = 0.01,
        k_smooth: float = 0.75,
    ):
        self.n_outliers, self.group, self.w_clip, self.a_clip = n_outliers, group, w_clip, a_clip
        self.use_gptq, self.reorder, self.damp, self.k_smooth = use_gptq, reorder, damp, k_smooth
        self.needs_calibration = use_gptq or reorder or k_smooth > 0
        self.kv_k: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # layer -> (shift, scale), each (G, Dh)

    def segments(self, n_in: int):
        n_normal = n_in - self.n_outliers
        if n_normal <= 0 or n_normal % self.group:
            raise PyquantError(
                f"atom: {n_in} channels minus {self.n_outliers} outliers is not a multiple of "
                f"the group size {self.group}"
            )
        segs = [(n_normal, AbsMax(4, self.w_clip), self.group)]
        return segs + ([(self.n_outliers, AbsMax(8), self.n_outliers)] if self.n_outliers else [])

    @torch.no_grad()
    def quantize_layer(self, ctx) -> dict[str, W4A4]:
        if self.k_smooth > 0:
            self.kv_k[ctx.index] = kv_k_stats(ctx, self.k_smooth)
        records = {}
        for stage in ctx.layout.sequential:
            leader = ctx.module(stage[0])
            n_in = leader.in_features
            hessian, act_max = GPTQ(n_in), torch.zeros(n_in)

            def stat(n, x, h=hessian, a=act_max):
                a.copy_(torch.maximum(a, x.abs().amax(dim=0)))
                if self.use_gptq:
                    h.add_batch(x)

            ctx.capture([stage[0]], stat)
            perm = torch.argsort(act_max) if self.reorder else torch.arange(n_in)
            hessian.H = hessian.H[perm][:, perm]
            segs = self.segments(n_in)
            for n in stage:
                module = ctx.module(n)
                w = module.weight.data[:, perm]
                if self.use_gptq:
                    parts, _ = hessian.quantize(w, segs[0][1], self.group, damp=self.damp, segments=segs)
                else:
                    c0, parts = 0, []
                    for size, grid, group in segs:
                        parts.append(rtn(w[:, c0 : c0 + size], grid, group))
                        c0 += size
                deq = np.concatenate([p.dequantize() for p in parts], axis=1)
                module.weight.data[:, perm] = torch.from_numpy(deq)
                gi = [GroupInt(p.codes, p.scale, None, p.grid.bits) for p in parts]
                records[n] = W4A4(
                    perm.numpy(), gi[0], gi[1] if len(gi) > 1 else None, 4, self.group, self.a_clip
                )
        return records


class _KeyRecorder:
    """Stands in for transformers' Cache in one layer call: its update() receives the layer's post-RoPE K and
    V (B, G, T, Dh), keeps K, and stops the layer (nothing after attention is needed)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []

    def update(self, k, v, *args, **kwargs):
        self.keys.append(k.detach()[0].transpose(0, 1)[1:].clone())  # (T - 1, G, Dh), the sink left out
        raise _Stop


@torch.no_grad()
def kv_k_stats(ctx, k_smooth: float) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) (G, Dh) float32 of the layer's post-RoPE K on its calibration inputs."""
    rec = _KeyRecorder()
    kwargs = dict(ctx.kwargs)
    kwargs["cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"] = rec
    for x in ctx.inputs:
        try:
            ctx.layer(x, **kwargs)
        except _Stop:
            pass
    if not rec.keys:
        raise PyquantError("atom: the decoder layer never updated its KV cache; cannot calibrate K")
    k = torch.cat(rec.keys)
    shift = k.mean(0)
    scale = (k - shift).abs().amax(0).clamp(min=1e-6).pow(k_smooth)
    return shift.numpy().astype(np.float32), (scale / scale.mean()).numpy().astype(np.float32)
