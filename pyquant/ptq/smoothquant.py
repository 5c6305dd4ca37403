"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models"): per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (alpha 0.5), with the max
over the calibration tokens and over the rows of every linear the norm feeds. X / s is folded into the
norm's weight and W * s into the linears' columns, which moves the activation outliers into the weights; then
W8A8: weights round-to-nearest int8 (Q8_0 blocks of 32 for ggml, or one scale per row for pyquant's
per-token path), activations quantized at run time (ggml: Q8_0 blocks of 32; pyquant w8a8: per token).

As in the reference smooth_lm for Llama-like models, only norm -> linears pairs are smoothed (q/k/v and
gate/up); o_proj and down_proj keep their inputs.
"""

from __future__ import annotations

import torch

from .grids import AbsMax, QuantWeight, rtn


class SmoothQuant:
    """The migration scales from activation and weight channel maxima."""

    def __init__(self, alpha: float = 0.5):
        self.alpha = alpha

    def scales(self, act_max: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        w_max = torch.cat(weights).abs().amax(dim=0).clamp(min=1e-5)
        s = act_max.clamp(min=1e-5).pow(self.alpha) / w_max.pow(1 - self.alpha)
        return s.clamp(min=1e-5)


class SmoothQuantMethod:
    name = "smoothquant"
    needs_calibration = True

    def __init__(self, alpha: float = 0.5, per_channel: bool = False):
        self.alpha, self.per_channel = alpha, per_channel
        self.grid = AbsMax(8)

    @torch.no_grad()
    def quantize_layer(self, ctx) -> dict[str, QuantWeight]:
        folds = [f for f in ctx.layout.folds if f.kind != "linear"]
        leaders = [f.linears[0] for f in folds]
        act_max: dict[str, torch.Tensor] = {}

        def stat(n, x):
            m = x.abs().amax(dim=0)
            act_max[n] = torch.maximum(act_max[n], m) if n in act_max else m

        ctx.capture(leaders, stat)
        sq = SmoothQuant(self.alpha)
        for f in folds:
            ctx.fold(f, sq.scales(act_max[f.linears[0]], [ctx.module(n).weight for n in f.linears]))
        records = {}
        for n in ctx.layout.linears:
            module = ctx.module(n)
            qw = rtn(module.weight.data, self.grid, module.in_features if self.per_channel else 32)
            module.weight.data.copy_(torch.from_numpy(qw.dequantize()))
            records[n] = qw
        return records
