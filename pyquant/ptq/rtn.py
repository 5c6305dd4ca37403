"""Round-to-nearest: every linear quantized on its own grid, no calibration; the baseline the calibrated
methods are measured against. (On the Q4_0 grid it differs from llama.cpp's Q4_0 quantizer only in rounding
against the stored float16 scale rather than the float32 one; `pyquant convert --type q4_0` is ggml's.)"""

from __future__ import annotations

import torch

from .grids import Grid, QuantWeight, rtn


class RTNMethod:
    name = "rtn"
    needs_calibration = False

    def __init__(self, grid: Grid, group: int):
        self.grid, self.group = grid, group

    @torch.no_grad()
    def quantize_layer(self, ctx) -> dict[str, QuantWeight]:
        records = {}
        for n in ctx.layout.linears:
            module = ctx.module(n)
            qw = rtn(module.weight, self.grid, self.group or module.in_features)
            module.weight.data.copy_(torch.from_numpy(qw.dequantize()))
            records[n] = qw
        return records
