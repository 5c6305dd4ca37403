"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), following IST-DASLab's reference gptq.py step for step: Hessian H = 2/n sum x x^T of the
layer's inputs, dead columns zeroed, optional act-order (columns by descending diag(H)), damping
0.01 * mean(diag(H)), the upper Cholesky factor of H^-1, then columns quantized in blocks of 128, each
column's error spread over the rest of its block at once and over the later blocks lazily, per block.

Two departures, both so that the result is exactly a ggml block format:
- a group's scale is chosen when the first column of the group is reached, from the weights as updated so
  far (the reference reads the not-yet-updated copy for in-block columns);
- with act-order, groups stay the contiguous 32-column runs of the original order, their parameters chosen
  from the original weights up front (the reference's `static_groups`); per-channel grids are static too.

`segments` lets one call use different grids on consecutive column ranges (Atom: int4 groups, then the
int8 outlier channels), each returned as its own QuantWeight.
"""

from __future__ import annotations

import math

import torch

from .grids import Grid, QuantWeight


class GPTQ:
    """Accumulates the Hessian of one linear's inputs, then quantizes its weight."""

    def __init__(self, n_in: int):
        self.H = torch.zeros(n_in, n_in, dtype=torch.float64)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = math.sqrt(2 / self.n) * x
        self.H += (x.T @ x).double()  # float32 products (as the reference), summed over batches in float64

    def quantize(
        self,
        w: torch.Tensor,
        grid: Grid,
        group: int,
        act_order: bool = False,
        damp: float = 0.01,
        block: int = 128,
        segments: list[tuple[int, Grid, int]] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[list[QuantWeight], float]:
        """w (out, in) -> (one QuantWeight per segment, the summed OBS loss). `segments` is a list of
        (n_columns, grid, group) covering the columns in order; by default one segment of `grid`, `group`.
        Runs on one thread: the column loop is thousands of small ops, which a second OpenMP thread slows
        down several times on a busy machine."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._quantize(w, grid, group, act_order, damp, block, segments, dtype)
        finally:
            torch.set_num_threads(threads)

    def _quantize(self, w, grid, group, act_order, damp, block, segments, dtype):
        rows, n = w.shape
        segments = segments or [(n, grid, group)]
        W = w.detach().to(dtype).clone()
        H = self.H.to(dtype).clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        # per column: its segment's grid, its group id (global), whether groups are static
        col_grid, col_group, starts, g0 = [], [], [], 0
        for seg_n, seg_grid, seg_group in segments:
            for c in range(seg_n):
                col_grid.append(seg_grid)
                col_group.append(g0 + c // seg_group)
            for k in range(seg_n // seg_group):
                starts.append((len(col_grid) - seg_n + k * seg_group, seg_group, seg_grid))
            g0 += seg_n // seg_group
        # lazily chosen groups must lie inside one column block; otherwise (and with act-order) static
        static = act_order or any(c0 // block != (c0 + size - 1) // block for c0, size, _ in starts)
        n_groups = g0
        scale = torch.zeros(rows, n_groups, dtype=dtype)
        zero = torch.zeros(rows, n_groups, dtype=dtype)
        has_zero = [False] * n_groups

        def choose(gi: int, cols: torch.Tensor) -> None:
            s, z = starts[gi][2].params(cols)
            scale[:, gi] = s
            if z is not None:
                zero[:, gi], has_zero[gi] = z, True

        if static:
            for gi, (c0, size, _) in enumerate(starts):
                choose(gi, W[:, c0 : c0 + size])

        perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
        W, H = W[:, perm], H[perm][:, perm]
        H[range(n), range(n)] += damp * torch.mean(torch.diag(H))
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        C = torch.zeros_like(W)  # codes, in processing order
        losses = torch.zeros(rows, dtype=dtype)
        for i1 in range(0, n, block):
            i2 = min(i1 + block, n)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                c = int(perm[i1 + i])
                gi = col_group[c]
                if not static and c == starts[gi][0]:
                    choose(gi, W1[:, i : i + starts[gi][1]])
                z = zero[:, gi] if has_zero[gi] else None
                g = col_grid[c]
                wcol = W1[:, i]
                code = g.codes(wcol, scale[:, gi], z)
                q = g.values(code, scale[:, gi], z)
                C[:, i1 + i] = code
                d = Hinv1[i, i]
                losses += (wcol - q) ** 2 / d**2 / 2
                err = (wcol - q) / d
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        C = C[:, torch.argsort(perm)].to(torch.int8)
        out, c0, g0 = [], 0, 0
        for seg_n, seg_grid, seg_group in segments:
            k = seg_n // seg_group
            s = scale[:, g0 : g0 + k].to(torch.float32)
            z = zero[:, g0 : g0 + k].to(torch.float32) if has_zero[g0] else None
            codes = C[:, c0 : c0 + seg_n].numpy().copy()
            out.append(QuantWeight(codes, s.numpy(), None if z is None else z.numpy(), seg_group, seg_grid))
            c0, g0 = c0 + seg_n, g0 + k
        return out, float(losses.sum())


class GPTQMethod:
    """GPTQ over a decoder layer: one Hessian per true-sequential group (the group's linears share their
    input), each group quantized before the next group's inputs are captured."""

    name = "gptq"
    needs_calibration = True

    def __init__(
        self,
        grid: Grid,
        group: int,
        act_order: bool = False,
        damp: float = 0.01,
        block: int = 128,
        true_sequential: bool = True,
        mix=None,
    ):
        """mix: None, or an object whose grid(linear name, layer index, n_layers) overrides `grid` per linear
        (grids.SensitiveMix)."""
        self.grid, self.group, self.act_order, self.damp, self.block = grid, group, act_order, damp, block
        self.true_sequential, self.mix = true_sequential, mix
        self.losses: dict[str, float] = {}

    def quantize_layer(self, ctx) -> dict[str, QuantWeight]:
        groups = ctx.layout.sequential
        stages = groups if self.true_sequential else [tuple(n for g in groups for n in g)]
        records = {}
        for stage in stages:
            leaders = [g[0] for g in groups if g[0] in stage]
            hessians = {n: GPTQ(ctx.module(n).in_features) for n in leaders}
            ctx.capture(leaders, lambda n, x, h=hessians: h[n].add_batch(x))
            for g in groups:
                if g[0] not in stage:
                    continue
                for n in g:
                    module = ctx.module(n)
                    group = self.group or module.in_features
                    grid = self.mix.grid(n, ctx.index, ctx.n_layers) if self.mix else self.grid
                    (qw,), loss = hessians[g[0]].quantize(
                        module.weight, grid, group, self.act_order, self.damp, self.block
                    )
                    module.weight.data.copy_(torch.from_numpy(qw.dequantize()))
                    self.losses[f"{ctx.index}.{n}"] = loss
                    records[n] = qw
        return records
