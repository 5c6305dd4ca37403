"""Token sampling over one row of logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The order follows llama.cpp's default sampler chain: penalties, then top-k, top-p, min-p, temperature, draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PyquantError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise PyquantError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PyquantError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise PyquantError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise PyquantError(f"top_k must be >= 0, got {self.top_k}")
        if self.repeat_penalty <= 0:
            raise PyquantError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.check()
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    @property
    def greedy(self) -> bool:
        """True when a draw is np.argmax of the raw logits (no penalty): what a device argmax computes."""
        return self.p.temperature == 0 and self.p.repeat_penalty == 1.0

    def penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """CTRL-style repetition penalty on the last n tokens: positive logits divided, negative multiplied."""
        if self.p.repeat_penalty == 1.0 or not history:
            return logits
        recent = np.unique(np.asarray(history[-self.p.repeat_last_n :], dtype=np.int64))
        logits = logits.copy()
        vals = logits[recent]
        logits[recent] = np.where(vals > 0, vals / self.p.repeat_penalty, vals * self.p.repeat_penalty)
        return logits

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        logits = self.penalize(np.asarray(logits, dtype=np.float32), history)
        if self.p.temperature == 0:
            return int(np.argmax(logits))
        ids = np.argsort(-logits, kind="stable")
        if self.p.top_k:
            ids = ids[: self.p.top_k]
        z = logits[ids].astype(np.float64)
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if self.p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.p.top_p) + 1)
            ids, z, probs = ids[:keep], z[:keep], probs[:keep]
        if self.p.min_p > 0:
            keep = probs >= self.p.min_p * probs[0]
            ids, z = ids[keep], z[keep]
        z = z / self.p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        return int(ids[self.rng.choice(len(ids), p=probs)])
