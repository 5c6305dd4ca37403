"""LLM.int8() (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"):
vector-wise int8 weights (one absmax scale per output row), no calibration. At run time
(pyquant/ptq/runtime.py Int8Mixed) the activation columns holding any |x| > 6.0 are split off and multiplied
in float with the dequantized weight columns; the rest is int8 per-token x int8 per-row, accumulated in int32.
This is bitsandbytes' inference path (weights kept as int8 only, outlier columns dequantized from them).
"""

from __future__ import annotations

import torch

from .grids import AbsMax, QuantWeight, rtn


class LLMInt8Method:
    name = "llm_int8"
    needs_calibration = False

    def __init__(self):
        self.grid = AbsMax(8)

    @torch.no_grad()
    def quantize_layer(self, ctx) -> dict[str, QuantWeight]:
        records = {}
        for n in ctx.layout.linears:
            module = ctx.module(n)
            qw = rtn(module.weight.data, self.grid, module.in_features)
            module.weight.data.copy_(torch.from_numpy(qw.dequantize()))
            records[n] = qw
        return records
