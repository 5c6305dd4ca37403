"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"),
after llm-awq's auto_scale / auto_clip:

- scale search: for each op -> linears pair, s = mean|x|^alpha (normalized by sqrt(max(s) min(s))) over a
  grid of 20 alphas in [0, 1); the weights are quantized as Q(W * s) / s and the alpha with the smallest
  output error wins; s is then folded into the op (a norm's weight, a linear's rows) and the linears'
  columns. The error is measured at the linears' outputs (concatenated) on a sample of calibration tokens;
  llm-awq measures it after the attention block / MLP, which needs the whole block run 20 times per layer,
  more than two CPU cores can afford for a 0.5B model.
- clip search: per (row, group), the largest |w| shrunk by up to 50% in 20 steps, keeping the clip with the
  smallest error of the group's partial dot products (not for q/k, as llm-awq).
- the searches see --search-tokens tokens (2048). The clip search: the 64 with the largest activations and a
  random sample. llm-awq clips on 512 strided tokens; a sample that misses the rare massive-activation
  tokens (Qwen's first-token sinks) lets the clip search cut exactly the weights those tokens need. The
  scale search: a random sample alone, with the sinks as rare as in text (64 of 2048 tokens a thousand
  times larger than the rest own a squared error). Measured on Qwen2.5-0.5B (WikiText-2, 8 chunks): both
  searches on the top-64 sample PPL 36.17, KLD 0.119; this split 35.41, KLD 0.115; round-to-nearest Q4_0
  32.02: AWQ is still worse than RTN there, for a reason not found yet.
- then round-to-nearest on the grid (Q4_0 or Q4_1 at 4 bits, group 32).
"""

from __future__ import annotations

import torch

from .grids import Grid, QuantWeight, rtn

NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


class AWQ:
    """Model-independent AWQ searches on captured inputs x (tokens, in) and weights (out, in)."""

    def __init__(
        self, grid: Grid, group: int, n_grid: int = 20, max_shrink: float = 0.5, clip_tokens: int = 512
    ):
        self.grid, self.group, self.n_grid = grid, group, n_grid
        self.max_shrink, self.clip_tokens = max_shrink, clip_tokens

    def fake(self, w: torch.Tensor, group: int | None = None) -> torch.Tensor:
        g = group or self.group or w.shape[1]
        return self.grid.fake(w.reshape(w.shape[0], -1, g)).reshape(w.shape)

    @torch.no_grad()
    def search_scale(self, x: torch.Tensor, weights: list[torch.Tensor], x_mean: torch.Tensor | None = None):
        """(s (in,), best alpha, [loss per alpha]) for linears sharing the input x."""
        w = torch.cat(weights)
        x_mean = x.abs().mean(0) if x_mean is None else x_mean
        y = x @ w.T
        losses, best = [], (float("inf"), None, None)
        for i in range(self.n_grid):
            alpha = i / self.n_grid
            s = self.alpha_scale(x_mean, alpha)
            loss = float(((x @ (self.fake(w * s) / s).T - y) ** 2).mean())
            losses.append(loss)
            if loss < best[0]:
                best = (loss, s, alpha)
        return best[1], best[2], losses

    @staticmethod
    def alpha_scale(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
        s = x_mean.pow(alpha).clamp(min=1e-4)
        return s / (s.max() * s.min()).sqrt()

    @torch.no_grad()
    def search_clip(self, x: torch.Tensor, w: torch.Tensor, row_batch: int = 128) -> torch.Tensor:
        """Per-(row, group) clip values (out, n_groups) minimizing the error of the groups' partial sums."""
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
                q = self.grid.fake(torch.clamp(wb, -m, m))
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
        self, grid: Grid, group: int, n_grid: int = 20, clip: bool = True, search_tokens: int = 2048
    ):
        self.grid, self.group, self.n_grid, self.clip, self.search_tokens = (
            grid,
            group,
            n_grid,
            clip,
            search_tokens,
        )
        self.alphas: dict[str, float] = {}

    @torch.no_grad()
    def quantize_layer(self, ctx) -> dict[str, QuantWeight]:
        folds = ctx.layout.folds
        sums: dict[str, torch.Tensor] = {}
        count = [0]

        def stat(n, x):
            sums[n] = sums.get(n, 0) + x.abs().sum(0)
            count[0] += x.shape[0] if n == folds[0].linears[0] else 0

        leaders = [f.linears[0] for f in folds]
        xs = {n: [] for n in leaders}
        ctx.capture(leaders, lambda n, x: (stat(n, x), xs[n].append(x)))
        scale_xs = {}
        for n in leaders:
            x = torch.cat(xs.pop(n))
            xs[n] = search_tokens(x, self.search_tokens, seed=ctx.index)
            scale_xs[n] = search_tokens(x, self.search_tokens, n_top=0, seed=ctx.index)
        means = {n: sums[n] / count[0] for n in leaders}

        algo = AWQ(self.grid, self.group, self.n_grid)
        for f in folds:
            if not ctx.fold_ok(f):
                continue
            n = f.linears[0]
            s, alpha, _ = algo.search_scale(scale_xs[n], [ctx.module(m).weight for m in f.linears], means[n])
            ctx.fold(f, s)
            xs[n] /= s
            self.alphas[f"{ctx.index}.{f.prev}"] = alpha

        records = {}
        for f in folds:
            for n in f.linears:
                module = ctx.module(n)
                w = module.weight.data
                if self.clip and n not in NO_CLIP:
                    w = algo.clamp(w, algo.search_clip(xs[f.linears[0]], w))
                qw = rtn(w, self.grid, self.group or w.shape[1])
                module.weight.data.copy_(torch.from_numpy(qw.dequantize()))
                records[n] = qw
        return records
