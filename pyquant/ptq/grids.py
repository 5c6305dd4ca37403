"""Quantization grids shared by the PTQ algorithms, and the quantized weight they produce.

A grid turns a group of weights (rows, g) into per-row parameters, and weights into integer codes on those
parameters. Scales and minimums are rounded to float16 when chosen, so the values an algorithm sees are the
values a file stores, bit for bit:

- `SignedMax(b)`: ggml's legacy symmetric rule (Q4_0, and Q8_0's sign-free cousin): d = m / -2^(b-1) where m
  is the weight of largest magnitude, codes in [-2^(b-1), 2^(b-1) - 1], value = d * code. b=4 is Q4_0.
- `AbsMax(b, clip)`: d = clip * max|w| / (2^(b-1) - 1), same code range (Q8_0 at b=8, clip=1; Atom's int4
  and int8 with a clip ratio).
- `MinMax(b)`: ggml's asymmetric rule (Q4_1): d = (max - min) / (2^b - 1), m = min, codes in [0, 2^b - 1],
  value = d * code + m.

`QuantWeight` holds codes + per-group parameters of one (out, in) matrix. `ggml_type` says which ggml type
stores it exactly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 for any group size that is a multiple of 32, per-channel
included), `ggml_bytes()` packs it; anything else is stored by pyquant/ptq/runtime.py as pyquant tensors.

`SensitiveMix` picks a grid per linear (opt-in `--mix sensitive`): higher-precision ggml grids for the
tensors llama.cpp's Q4_K_M also favours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyquant.errors import PyquantError


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-65504, 65504).to(torch.float16).to(torch.float32)


class Grid:
    bits: int
    sym: bool
    lo: int
    hi: int

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """w (rows, g) -> scale (rows,), zero/min (rows,) or None."""
        raise NotImplementedError

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        s = scale.unsqueeze(-1) if scale.dim() == w.dim() - 1 else scale
        inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
        if zero is None:
            return torch.clamp(torch.round(w * inv), self.lo, self.hi)
        z = zero.unsqueeze(-1) if zero.dim() == w.dim() - 1 else zero
        return torch.clamp(torch.round((w - z) * inv), self.lo, self.hi)

    def values(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        s = scale.unsqueeze(-1) if scale.dim() == codes.dim() - 1 else scale
        if zero is None:
            return codes * s
        z = zero.unsqueeze(-1) if zero.dim() == codes.dim() - 1 else zero
        return codes * s + z

    def fake(self, w: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest of w (rows, g) on its own parameters."""
        scale, zero = self.params(w)
        return self.values(self.codes(w, scale, zero), scale, zero)


class SignedMax(Grid):
    def __init__(self, bits: int):
        self.bits, self.sym, self.lo, self.hi = bits, True, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def params(self, w):
        idx = w.abs().argmax(dim=-1, keepdim=True)
        m = torch.gather(w, -1, idx).squeeze(-1)
        return _f16(m / self.lo), None

    def __repr__(self):
        return f"SignedMax({self.bits})"


class AbsMax(Grid):
    def __init__(self, bits: int, clip: float = 1.0):
        self.bits, self.sym, self.clip = bits, True, clip
        self.lo, self.hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def params(self, w):
        return _f16(self.clip * w.abs().amax(dim=-1) / self.hi), None

    def __repr__(self):
        return f"AbsMax({self.bits}, clip={self.clip})"


class MinMax(Grid):
    def __init__(self, bits: int):
        self.bits, self.sym, self.lo, self.hi = bits, False, 0, 2**bits - 1

    def params(self, w):
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        return _f16((hi - lo) / self.hi), _f16(lo)

    def __repr__(self):
        return f"MinMax({self.bits})"


class MSEClip(Grid):
    """A grid whose parameters come from the weights shrunk by the factor p in (1 - max_shrink, 1] that
    minimizes sum |w - Q(w)|^norm per row (IST-DASLab's quantizer with mse=True: 100 steps, 2.4)."""

    def __init__(self, base: Grid, steps: int = 100, max_shrink: float = 0.2, norm: float = 2.4):
        self.base, self.steps, self.max_shrink, self.norm = base, steps, max_shrink, norm
        self.bits, self.sym, self.lo, self.hi = base.bits, base.sym, base.lo, base.hi

    def params(self, w):
        best, best_err = self.base.params(w), None
        for i in range(int(self.max_shrink * self.steps)):
            s, z = self.base.params(w * (1 - i / self.steps))
            err = (self.base.values(self.base.codes(w, s, z), s, z) - w).abs().pow(self.norm).sum(dim=-1)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, s, best[0]), None if z is None else torch.where(better, z, best[1]))
        return best

    def __repr__(self):
        return f"MSEClip({self.base!r})"


def unwrap(grid: Grid) -> Grid:
    return grid.base if isinstance(grid, MSEClip) else grid


def weight_grid(bits: int, sym: bool, mse: bool = False) -> Grid:
    """The grid GPTQ, AWQ and RTN use: ggml's rules, so 4-bit sym is Q4_0, 4-bit asym Q4_1, 8-bit sym Q8_0."""
    if bits not in (2, 3, 4, 8):
        raise PyquantError(f"--bits must be 2, 3, 4 or 8, not {bits}")
    grid = AbsMax(8) if bits == 8 and sym else SignedMax(bits) if sym else MinMax(bits)
    return MSEClip(grid) if mse else grid


class SensitiveMix:
    """Q4_K_M's choice of sensitive tensors on 32-value ggml grids: attn_v (v_proj) on Q8_0, ffn_down
    (down_proj) one 5-bit grid up (Q5_0 over a symmetric base, Q5_1 over an asymmetric one) and on Q8_0 in
    the first and last 3 layers; every other linear on the base grid. On Qwen2.5-0.5B (24 layers) a Q4_1
    base gives 5.50 bits per weight in the decoder blocks (llama.cpp's Q4_K_M: 5.52), a Q4_0 base 5.04."""

    def __init__(self, base: Grid, edge_layers: int = 3):
        self.base, self.edge = base, edge_layers

    def _wrap(self, g: Grid) -> Grid:
        return MSEClip(g) if isinstance(self.base, MSEClip) else g

    def grid(self, name: str, index: int, n_layers: int) -> Grid:
        edge = index < self.edge or index >= n_layers - self.edge
        if name.endswith("v_proj") or (name.endswith("down_proj") and edge):
            return self._wrap(AbsMax(8))
        if name.endswith("down_proj"):
            return self._wrap(SignedMax(5) if self.base.sym else MinMax(5))
        return self.base


@dataclass
class QuantWeight:
    """An (out, in) matrix as integer codes and per-(row, group) scales (and minimums for asymmetric grids)."""

    codes: np.ndarray  # int8 (out, in)
    scale: np.ndarray  # float32 (out, in // group), float16-exact
    zero: np.ndarray | None  # float32 (out, in // group) minimums (MinMax), float16-exact, or None
    group: int
    grid: Grid

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        s = np.repeat(self.scale, self.group, axis=1)
        w = self.codes.astype(np.float32) * s
        return w + np.repeat(self.zero, self.group, axis=1) if self.zero is not None else w

    @property
    def ggml_type(self) -> str | None:
        """The ggml type that holds these values exactly, or None."""
        if self.group % 32 or self.shape[1] % 32:
            return None
        g = unwrap(self.grid)
        if g.bits in (4, 5) and isinstance(g, SignedMax):
            return f"q{g.bits}_0"
        if g.bits in (4, 5) and isinstance(g, MinMax):
            return f"q{g.bits}_1"
        if g.bits == 8 and g.sym and g.lo >= -128:
            return "q8_0"
        return None

    def ggml_bytes(self) -> np.ndarray:
        """Packed GGUF rows (out, row_bytes) of `ggml_type`."""
        t = self.ggml_type
        if t is None:
            raise PyquantError(f"{self.grid} with group {self.group} has no ggml type")
        out = self.shape[0]
        rep = self.group // 32
        d = np.repeat(self.scale, rep, axis=1).reshape(-1).astype(np.float16).view(np.uint8).reshape(-1, 2)
        codes = self.codes.reshape(-1, 32)
        if t == "q8_0":
            blocks = np.concatenate([d, codes.astype(np.int8).view(np.uint8)], axis=1)
        else:
            u = (codes.astype(np.int16) + {"q4_0": 8, "q5_0": 16}.get(t, 0)).astype(np.uint8)
            qs = (u[:, :16] & 15) | ((u[:, 16:] & 15) << 4)
            parts = [d]
            if t in ("q4_1", "q5_1"):
                m = (
                    np.repeat(self.zero, rep, axis=1)
                    .reshape(-1)
                    .astype(np.float16)
                    .view(np.uint8)
                    .reshape(-1, 2)
                )
                parts.append(m)
            if t in ("q5_0", "q5_1"):  # qh: bit j = the fifth bit of value j, a little-endian uint32
                qh = ((u >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(
                    axis=1, dtype=np.uint32
                )
                parts.append(qh.astype("<u4").view(np.uint8).reshape(-1, 4))
            blocks = np.concatenate(parts + [qs], axis=1)
        return np.ascontiguousarray(blocks.reshape(out, -1))


def rtn(w: torch.Tensor, grid: Grid, group: int) -> QuantWeight:
    """Round-to-nearest of w (out, in) in groups of `group` columns (group = in: per channel)."""
    out, n = w.shape
    if n % group:
        raise PyquantError(f"row length {n} is not a multiple of the group size {group}")
    wg = w.reshape(out, n // group, group)
    scale, zero = grid.params(wg)
    codes = grid.codes(wg, scale, zero).reshape(out, n)
    return QuantWeight(
        codes.to(torch.int8).numpy(),
        scale.numpy().astype(np.float32),
        None if zero is None else zero.numpy().astype(np.float32),
        group,
        grid,
    )
