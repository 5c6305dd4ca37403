"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"),
after llm-awq's auto_scale / auto_clip and AutoAWQ's duo scaling:

- scale search: for each op -> linears pair, s = mean|x|^alpha / w_mean^(1 - alpha) (AutoAWQ's duo scaling;
  w_mean: per input channel, the mean over rows of |w| relative to its group's max), normalized by
  sqrt(max(s) min(s)), over a grid of 20 alphas in [0, 1); the weights are quantized as Q(W * s) / s on the
  stored grid and the alpha with the smallest error of the layout's `Fold.block` output wins, as llm-awq
  measures it: the attention block's output for the q/k/v scales (q/k errors count through the softmax,
  and each window's attention-sink token through every query), the MLP's output for gate/up, the linear's
  own output for up -> down (and v -> o, skipped under grouped-query attention). The block runs on the
  first whole calibration windows holding --search-tokens tokens (2048: 4 of 512). s is then folded into
  the op (a norm's weight, a linear's rows) and the linears' columns; alpha = 0 without duo scaling is
  round-to-nearest bit for bit (tests/test_ptq.py).
- clip search: per (row, group), the largest |w| shrunk by up to 50% in 20 steps, keeping the clip with the
  smallest error of the group's partial dot products (not for q/k, as llm-awq), on the 64 tokens with the
  largest activations and a random sample (2048 in all).
- then round-to-nearest on the grid (Q4_0 or Q4_1 at 4 bits, group 32).

Measured on Qwen2.5-0.5B (torch, fake-quantized weights, float embeddings; 8 calibration windows; WikiText-2
test 4 x 512, float PPL 24.68), Q4_0 without clipping: RTN PPL 26.59 KLD 0.1066; the earlier search (loss at
the concatenated q/k/v and gate/up outputs, random tokens) 27.91 KLD 0.1121, worse than RTN; the block-output
loss 27.10 KLD 0.1013; with duo scaling 26.85 KLD 0.0973. The alpha = 0 check holds, so the fold and export
paths were not the cause: the per-linear loss was (it rated q/k output error as raw MSE and never saw the
sink tokens' keys through attention). The GGUF file (32 windows, no clipping, `pyquant eval` 8 x 512 on the
CPU backend): PPL 31.882 KLD 0.0991, llama.cpp's Q4_0 RTN 32.021 KLD 0.0992 (before: 33.466 KLD 0.1105).
With clipping (opt-in, --clip) the same protocol gave PPL 34.081 but KLD 0.0888 and top-1 83.1 % (81.9 %
without): closer to the float model on most tokens, much worse on a few, so perplexity, the figure the
method is held to, rises; no clipping is the default.
Tried and not kept (2026-12-07): each (row, group)'s scale refit to its codes by least squares under the
group's block of x^T x (GPTQ's objective within a group; llama.cpp's imatrix uses the diagonal), best of 17
starting scales. On calibration tokens held out of the fit it cut every linear's output error by 30-55 %, yet
the model did not follow (torch, 8 calibration windows, WikiText-2 test 12 x 512, Q4_0 at alpha 0): RTN KLD
0.1091 PPL 36.89, the fit 0.1094 / 38.09, its diagonal form 0.1177 / 38.02.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .grids import Grid, QuantWeight, rtn

NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


class AWQ:
    """Model-independent AWQ searches on captured inputs x (tokens, in) and weights (out, in)."""

    def __init__(
        self,
        grid: Grid,
        group: int,
        n_grid: int = 20,
        max_shrink: float = 0.5,
        clip_tokens: int = 512,
        duo: bool = True,
    ):
        self.grid, self.group, self.n_grid, self.duo = grid, group, n_grid, duo
        self.max_shrink, self.clip_tokens = max_shrink, clip_tokens

    def fake(self, w: torch.Tensor, group: int | None = None, grid: Grid | None = None) -> torch.Tensor:
        g = group or self.group or w.shape[1]
        return (grid or self.grid).fake(w.reshape(w.shape[0], -1, g)).reshape(w.shape)

    @torch.no_grad()
    def search_scale(self, x_mean: torch.Tensor, weights: list[torch.Tensor], block: Callable, grids=None):
        """(s (in,), best alpha, [loss per alpha]) for linears sharing an input of channel means x_mean;
        block(ws) -> the outputs (list of tensors) of the module the loss is measured at, run with the
        linears' weights ws, each quantized on its grid (grids: one a weight, default the AWQ's grid)."""
        grids = grids or [self.grid] * len(weights)
        ref = block(weights)
        n = sum(r.numel() for r in ref)
        w_mean = self.w_mean(weights) if self.duo else None
        losses, best = [], (float("inf"), None, None)
        for i in range(self.n_grid):
            alpha = i / self.n_grid
            s = self.alpha_scale(x_mean, alpha, w_mean)
            out = block([self.fake(w * s, grid=gr) / s for w, gr in zip(weights, grids)])
            loss = sum(float(((o - r) ** 2).sum()) for o, r in zip(out, ref)) / n
            losses.append(loss)
            if loss < best[0]:
                best = (loss, s, alpha)
        return best[1], best[2], losses

    def w_mean(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """Per input channel, the mean over rows of |w| relative to its group's max (AutoAWQ's w_mean)."""
        w = torch.cat(weights)
        g = self.group or w.shape[1]
        wg = w.abs().reshape(w.shape[0], -1, g)
        return (wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-12)).reshape(w.shape).mean(0)

    @staticmethod
    def alpha_scale(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
        s = x_mean.pow(alpha)
        if w_mean is not None:
            s = s / (w_mean.pow(1 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        return s / (s.max() * s.min()).sqrt()

    @torch.no_grad()
    def search_clip(
        self, x: torch.Tensor, w: torch.Tensor, row_batch: int = 128, grid: Grid | None = None
    ) -> torch.Tensor:
        """Per-(row, group) clip values (out, n_groups) minimizing the error of the groups' partial sums, the
        clipped weights rounded on `grid` (default the AWQ's grid)."""
        grid = grid or self.grid
        out, n = w.shape
        g = self.group or n
        xg = x[: self.clip_tokens].reshape(-1, n // g, g).transpose(0, 1)  # (G, T, g)
        best_max = torch.empty(out, n // g)
        for r0 in range(0, out, row_batch):
            wb = w[r0 : r0 + row_batch].reshape(-1, n // g, g)  # (ob, G, g)
            org_max = wb.abs().amax(dim=-1, keepdim=True)  # (ob, G, 1)
            ref = torch.bmm(xg, wb.permute(1, 2, 0))  # (G, T, ob)
            errs = torch.full(org_max.shape[:2], float("inf"))
            bm = org_max[..., 0].clone()
            for i in range(int(self.max_shrink * self.n_grid)):
                m = org_max * (1 - i / self.n_grid)
                q = grid.fake(torch.clamp(wb, -m, m))
                err = ((torch.bmm(xg, q.permute(1, 2, 0)) - ref) ** 2).mean(dim=1).T  # (ob, G)
                better = err < errs
                errs[better], bm[better] = err[better], m[..., 0][better]
            best_max[r0 : r0 + row_batch] = bm
        return best_max

    def clamp(self, w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
        g = self.group or w.shape[1]
        m = max_val[..., None]
        return torch.clamp(w.reshape(w.shape[0], -1, g), -m, m).reshape(w.shape)


def search_tokens(x: torch.Tensor, k: int, n_top: int = 64, seed: int = 0) -> torch.Tensor:
    """k rows of x for the searches: the n_top with the largest |x| (the rare tokens that carry LLMs' massive
    activations, e.g. the first of a sequence, whose channels the scales favour and clipping would ruin) and
    a seeded random sample of the rest."""
    if x.shape[0] <= k:
        return x.clone()
    top = torch.topk(x.abs().amax(dim=1), n_top).indices
    rest = torch.ones(x.shape[0], dtype=torch.bool)
    rest[top] = False
    pool = torch.nonzero(rest).squeeze(1)
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[: k - n_top]]
    return x[torch.cat([top, pick])].clone()


class AWQMethod:
    name = "awq"
    needs_calibration = True

    def __init__(
        self,
        grid: Grid,
        group: int,
        n_grid: int = 20,
        clip: bool = False,
        search_tokens: int = 2048,
        duo: bool = True,
        mix=None,
    ):
        """mix: None, or an object whose grid(linear name, layer index, n_layers) overrides `grid` per linear
        (grids.SensitiveMix): the scale search and the rounding then use each linear's own grid."""
        self.grid, self.group, self.n_grid, self.clip = grid, group, n_grid, clip
        self.search_tokens, self.duo, self.mix = search_tokens, duo, mix
        self.alphas: dict[str, float] = {}

    @torch.no_grad()
    def quantize_layer(self, ctx) -> dict[str, QuantWeight]:
        folds = [f for f in ctx.layout.folds if ctx.fold_ok(f)]
        sums: dict[str, torch.Tensor] = {}
        count = [0]

        def stat(n, x):
            sums[n] = sums.get(n, 0) + x.abs().sum(0)
            count[0] += x.shape[0] if n == folds[0].linears[0] else 0

        leaders = [f.linears[0] for f in ctx.layout.folds]
        xs = {n: [] for n in leaders}
        ctx.capture(leaders, lambda n, x: (stat(n, x), xs[n].append(x)))
        for n in leaders:
            xs[n] = search_tokens(torch.cat(xs.pop(n)), self.search_tokens, seed=ctx.index)
        means = {n: sums[n] / count[0] for n in leaders}
        blocks = [f.block or f.linears[0] for f in folds]
        n_windows = max(1, -(-self.search_tokens // ctx.inputs[0].shape[-2])) if ctx.inputs else 0
        calls = ctx.capture_calls(blocks, n_windows)

        algo = AWQ(self.grid, self.group, self.n_grid, duo=self.duo)

        def grid_of(name):
            return self.mix.grid(name, ctx.index, ctx.n_layers) if self.mix else self.grid

        for f, b in zip(folds, blocks):
            n = f.linears[0]
            linears = [ctx.module(m) for m in f.linears]
            s, alpha, _ = algo.search_scale(
                means[n],
                [m.weight.data for m in linears],
                _runner(ctx.module(b), linears, calls[b]),
                [grid_of(m) for m in f.linears],
            )
            ctx.fold(f, s)
            xs[n] /= s
            for args, kwargs in calls[b]:  # the block's input is what f.prev writes
                _input(args, kwargs).div_(s)
            self.alphas[f"{ctx.index}.{f.prev}"] = alpha

        records = {}
        for f in ctx.layout.folds:
            for n in f.linears:
                module = ctx.module(n)
                w = module.weight.data
                grid = grid_of(n)
                if self.clip and n not in NO_CLIP:
                    w = algo.clamp(w, algo.search_clip(xs[f.linears[0]], w, grid=grid))
                qw = rtn(w, grid, self.group or w.shape[1])
                module.weight.data.copy_(torch.from_numpy(qw.dequantize()))
                records[n] = qw
        return records


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _runner(block: torch.nn.Module, linears: list, calls: list) -> Callable:
    """block(ws): block's outputs on its captured calls with the linears' weights swapped for ws."""

    def run(ws):
        saved = [m.weight.data for m in linears]
        try:
            for m, w in zip(linears, ws):
                m.weight.data = w
            outs = [block(*args, **kwargs) for args, kwargs in calls]
            return [o[0] if isinstance(o, tuple) else o for o in outs]
        finally:
            for m, w in zip(linears, saved):
                m.weight.data = w

    return run
