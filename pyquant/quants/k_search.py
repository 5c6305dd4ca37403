"""The scale searches the K-quant quantizers share, vectorized over groups.

Each follows its namesake in llama.cpp's ggml/src/ggml-quants.c, step for step in float32, so that the codes
and scales come out bit-identical to quantize_row_q*_K_ref:
- `make_qkx2_quants`: asymmetric codes 0..nmax with a min; a grid of trial scales, each refit by weighted
  least squares, keeps the one with the smallest weighted error (Q2_K, Q4_K, Q5_K).
- `make_qx_quants`: symmetric codes -nmax..nmax-1; 18 trial scales around nmax/max, refit by least squares
  with weights x^2 (rmse_type 1; Q6_K).
- `make_q3_quants`: symmetric codes, then coordinate descent on single codes (Q3_K).
- `pack_scales_k4` / `unpack_scales_k4`: the 12-byte 6-bit scale+min field of Q4_K and Q5_K.

The searches take groups as rows, x (G, n), and work internally values-major, (n, G): every step is then a
contiguous vector op over all groups, and the in-order sums ggml's loops compute (`seqsum(..., axis=0)`) are
n vector adds. The loops are over trial scales or over the n values of a group, never over groups.
"""

from __future__ import annotations

import numpy as np

from .common import GROUP_MAX_EPS, first_absmax, nearest_int, seqsum

F32 = np.float32


def _weighted_error(scale, lo, lf, x, w, use_mad: bool):
    """sum_i w_i * err(scale * l_i + min - x_i), err = |.| or (.)^2, in C order; values-major in, (G,) out."""
    diff = scale * lf + lo - x
    return seqsum(w * (np.abs(diff) if use_mad else diff * diff), axis=0)


def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """x, w: float32 (G, n) -> scale (G,), the_min (G,) (stored as -min, >= 0), codes uint8 (G, n) in 0..nmax."""
    x, w = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)  # (n, G)
    with np.errstate(all="ignore"):
        lo = np.minimum(x.min(axis=0), F32(0))  # the min is never positive
        hi = x.max(axis=0)
        flat, flat_min = hi == lo, lo
        sum_w = seqsum(w, axis=0)
        sum_x = seqsum(w * x, axis=0)

        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale * (x - lo)), 0, nmax)
        best = _weighted_error(scale, lo, L.astype(F32), x, w, use_mad)

        for step in range(nstep + 1):
            # `lo` is the best min so far: each trial grid is laid over the current fit, as in ggml.
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo)
            trial = np.clip(nearest_int(iscale * (x - lo)), 0, nmax)
            lf = trial.astype(F32)
            wl = w * lf
            sum_l = seqsum(wl, axis=0)
            sum_l2 = seqsum(wl * lf, axis=0)
            sum_xl = seqsum(wl * x, axis=0)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            err = _weighted_error(this_scale, this_min, lf, x, w, use_mad)
            take = (D > 0) & (err < best)
            L = np.where(take, trial, L)
            best = np.where(take, err, best)
            scale = np.where(take, this_scale, scale)
            lo = np.where(take, this_min, lo)

    L = np.where(flat, 0, L).astype(np.uint8).T
    return np.where(flat, F32(0), scale), -np.where(flat, flat_min, lo), L


def _symmetric_codes(iscale, x, nmax: int):
    """clamp(nearest_int(iscale * x), -nmax, nmax - 1) as int32, values-major."""
    return np.clip(nearest_int(iscale * x), -nmax, nmax - 1)


def make_qx_quants(x, nmax: int):
    """rmse_type 1 without importance weights: x float32 (G, n) -> scale (G,), codes uint8 (G, n) in 0..2*nmax-1."""
    amax, vmax = first_absmax(x)
    x = np.ascontiguousarray(x.T)  # (n, G)
    w = x * x
    wx = w * x
    with np.errstate(all="ignore"):
        iscale = F32(-nmax) / vmax
        l = _symmetric_codes(iscale, x, nmax)
        lf = l.astype(F32)
        sumlx = seqsum(wx * lf, axis=0)
        suml2 = seqsum(w * lf * lf, axis=0)
        L = l + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / vmax
            l = _symmetric_codes(iscale, x, nmax)
            lf = l.astype(F32)
            sumlx = seqsum(wx * lf, axis=0)
            suml2 = seqsum(w * lf * lf, axis=0)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(take, l + nmax, L)
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale), np.where(zero, 0, L).astype(np.uint8).T


def make_q3_quants(x, nmax: int):
    """do_rmse variant: x float32 (G, n) -> scale (G,), codes uint8 (G, n) in 0..2*nmax-1."""
    amax, vmax = first_absmax(x)
    x = np.ascontiguousarray(x.T)  # (n, G)
    w = x * x
    wx = w * x
    with np.errstate(all="ignore"):
        iscale = F32(-nmax) / vmax
        L = _symmetric_codes(iscale, x, nmax)
        lf = L.astype(F32)
        sumlx = seqsum(wx * lf, axis=0)
        suml2 = seqsum(w * lf * lf, axis=0)
        for _ in range(5):
            any_changed = False
            for i in range(x.shape[0]):
                wi, xi, li = w[i], x[i], L[i].astype(F32)
                slx_rest = sumlx - wx[i] * li  # the sums without value i
                sl2_rest = suml2 - wi * li * li
                new_l = np.clip(nearest_int(xi * sl2_rest / slx_rest), -nmax, nmax - 1)
                nf = new_l.astype(F32)
                slx = slx_rest + wx[i] * nf
                sl2 = sl2_rest + wi * nf * nf
                accept = (slx_rest > 0) & (new_l != L[i])
                accept &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(accept, new_l, L[i])
                sumlx = np.where(accept, slx, sumlx)
                suml2 = np.where(accept, sl2, suml2)
                any_changed |= bool(accept.any())
            if not any_changed:  # a pass that changes nothing would change nothing again
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale), np.where(zero, 0, L + nmax).astype(np.uint8).T


def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins uint8 (n, 8) each -> the 12-byte field (n, 12) of Q4_K / Q5_K.

    Bytes 0-3: scale 0-3 | top bits of scale 4-7 in bits 6-7; bytes 4-7: min 0-3 | top bits of min 4-7;
    bytes 8-11: low nibble of scale 4-7 | low nibble of min 4-7 << 4.
    """
    hi_s, hi_m = ls[:, 4:] >> np.uint8(4), lm[:, 4:] >> np.uint8(4)
    return np.concatenate(
        [
            ls[:, :4] | (hi_s << np.uint8(6)),
            lm[:, :4] | (hi_m << np.uint8(6)),
            (ls[:, 4:] & np.uint8(0x0F)) | ((lm[:, 4:] & np.uint8(0x0F)) << np.uint8(4)),
        ],
        axis=1,
    )


def unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12-byte field uint8 (n, 12) -> scales, mins uint8 (n, 8) each (get_scale_min_k4)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate(
        [a & np.uint8(63), (c & np.uint8(0x0F)) | ((a >> np.uint8(6)) << np.uint8(4))], axis=1
    )
    mn = np.concatenate([b & np.uint8(63), (c >> np.uint8(4)) | ((b >> np.uint8(6)) << np.uint8(4))], axis=1)
    return sc, mn
