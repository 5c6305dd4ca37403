"""Composite weights: the PTQ results ggml types cannot express, their GGUF tensors, and their numpy
reference linear (the oracle for faster kernels). numpy only; no torch.

A backend's `linear(x, w, bias)` hands any weight with a `.linear(x)` method to it. `pyquant.model` asks
`composite_weights(file)` for the linears of a file written with composite weights (None otherwise).

File format (GGUF; llama.cpp refuses these files: general.architecture is "<arch>+pyquant-<method>",
reported as an unknown architecture):

    pyquant.architecture      str   the real architecture (its <arch>.* hyperparameter keys are as usual)
    pyquant.method            str   gptq | awq | rtn | smoothquant | llm_int8 | atom (every pyquant file)
    pyquant.linear.format     str   how every blk.*.{attn_q,attn_k,attn_v,attn_output,ffn_*} linear is stored:
        "gq"          weight-only group quantization (GPTQ/AWQ/RTN grids ggml cannot hold: 2/3 bits, 8-bit
                      asymmetric); activations stay float
        "w8a8"        int8 per-channel weights x int8 per-token activations, int32 accumulation (SmoothQuant)
        "int8_mixed"  LLM.int8(): as w8a8, except activation columns with any |x| > threshold, which are
                      multiplied in float with the dequantized weight columns (mixed-precision decomposition)
        "w4a4"        Atom: input channels reordered (pyquant.* perm), the last n_outlier channels int8 weights x
                      int8 per-token activations, the rest int4 weights (group G) x int4 per-token activations
                      in groups of G, each group's integer dot product scaled by its two scales
    pyquant.weight.bits       u32   code width of B.weight (w4a4: of the non-outlier part)
    pyquant.weight.sym        bool  symmetric codes (no B.min)
    pyquant.act.bits / pyquant.act.group_size / pyquant.act.clip     w4a4 activation quantization
    pyquant.llm_int8.threshold  f32 outlier threshold (6.0)
    pyquant.kv.bits / pyquant.kv.group_size   quantized KV cache (asymmetric, per token and head, 0: off)
    pyquant.kv.k_smooth       f32   exponent of K's static channel scale (KVQuant; 0: no shift/scale tensors)
    pyquant.calibration.*     text, samples, seq_len, seed

  Tensors of a linear whose ggml weight would be B.weight (B = "blk.N.attn_q", ...):
    B.weight          i8  (out, in * bits / 8)  codes - lo as unsigned, bit-packed little-endian along the row
                      (bit k of value j at bit j * bits + k); 8-bit codes are plain int8
    B.scale           f16 (out, in / group)     value = scale * code (+ min); group = in / columns of B.scale
    B.min             f16 (out, in / group)     asymmetric grids only
    B.perm            i32 (in,)                 w4a4: input channel order (activations are read x[:, perm])
    B.outlier         i8  (out, n_outlier)      w4a4: int8 weights of the last n_outlier reordered channels
    B.outlier_scale   f16 (out, 1)              w4a4: their per-row scale
  Per layer N, with a quantized KV cache whose K is shifted and scaled (KVQuant):
    blk.N.kv_k_shift  f32 (G, Dh)               subtracted from post-RoPE K before its codes are chosen
    blk.N.kv_k_scale  f32 (G, Dh)               then divided into it; read back as decoded * scale + shift
"""

from __future__ import annotations

import numpy as np

from pyquant.errors import GGUFError

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# ---- integer codes ------------------------------------------------------------------------------------


def code_range(bits: int, sym: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)


def pack_codes(codes: np.ndarray, bits: int, sym: bool) -> np.ndarray:
    """int8 (out, n) codes -> int8 (out, n * bits / 8) bytes."""
    if bits == 8:
        return np.ascontiguousarray(codes.astype(np.int8))
    lo, _ = code_range(bits, sym)
    u = (codes.astype(np.int16) - lo).astype(np.uint8)
    planes = (u[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (out, n, bits)
    packed = np.packbits(planes.reshape(u.shape[0], -1), axis=1, bitorder="little")
    return packed.view(np.int8)


def unpack_codes(packed: np.ndarray, bits: int, sym: bool) -> np.ndarray:
    """int8 (out, n * bits / 8) bytes -> int8 (out, n) codes."""
    if bits == 8:
        return np.asarray(packed, dtype=np.int8)
    lo, _ = code_range(bits, sym)
    planes = np.unpackbits(np.asarray(packed).view(np.uint8), axis=1, bitorder="little")
    planes = planes.reshape(packed.shape[0], -1, bits).astype(np.int16)
    return ((planes << np.arange(bits, dtype=np.int16)).sum(axis=2) + lo).astype(np.int8)


class GroupInt:
    """An (out, in) matrix as integer codes with per-(row, group) float16 scales (and minimums)."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int):
        self.codes, self.bits = np.asarray(codes, np.int8), bits
        self.scale = np.asarray(scale, np.float32)
        self.zero = None if zero is None else np.asarray(zero, np.float32)
        self.group = self.codes.shape[1] // self.scale.shape[1]

    @property
    def sym(self) -> bool:
        return self.zero is None

    def dequantize(self) -> np.ndarray:
        w = self.codes.astype(np.float32) * np.repeat(self.scale, self.group, axis=1)
        return w + np.repeat(self.zero, self.group, axis=1) if self.zero is not None else w

    def tensors(self, base: str, part: str = "") -> dict[str, tuple[str, np.ndarray]]:
        """GGUF tensors {name: (type, array)}: B.weight/B.scale/B.min, or B.<part>/B.<part>_scale/..."""
        pre = f"{base}.{part}_" if part else f"{base}."
        out = {
            f"{base}.{part or 'weight'}": ("i8", pack_codes(self.codes, self.bits, self.sym)),
            pre + "scale": ("f16", self.scale.astype(np.float16)),
        }
        if self.zero is not None:
            out[pre + "min"] = ("f16", self.zero.astype(np.float16))
        return out

    @classmethod
    def read(cls, f, base: str, bits: int, sym: bool, part: str = "") -> GroupInt:
        pre = f"{base}.{part}_" if part else f"{base}."
        codes = unpack_codes(f.tensor(f"{base}.{part or 'weight'}").array(), bits, sym)
        scale = f.tensor(pre + "scale").array().astype(np.float32)
        zero = None if sym else f.tensor(pre + "min").array().astype(np.float32)
        if codes.shape[0] != scale.shape[0] or codes.shape[1] % scale.shape[1]:
            raise GGUFError(f"{f.path}: {base}: codes {codes.shape} do not tile scales {scale.shape}")
        return cls(codes, scale, zero, bits)


# ---- activation quantization ---------------------------------------------------------------------------


def quantize_act(x: np.ndarray, bits: int, group: int | None = None, clip: float = 1.0):
    """Dynamic symmetric quantization of activations x (T, K), per token and per group of `group` channels
    (None: the whole row). Returns (codes float32 (T, K) of integers, scales float32 (T, K / group))."""
    t, k = x.shape
    g = group or k
    xg = x.reshape(t, k // g, g)
    hi = 2 ** (bits - 1) - 1
    s = np.float32(clip) * np.abs(xg).max(axis=2) / np.float32(hi)  # (T, G)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s[..., None] > 0, np.rint(xg / s[..., None]), 0)
    q = np.clip(q, -hi - 1, hi).astype(np.float32)
    return q.reshape(t, k), s.astype(np.float32)


def int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer-valued a (T, K) @ b (N, K)^T, exact as int32 accumulation would be: float64 holds every
    product sum of int8 values for K < 2^38 / 2^14, far beyond any model."""
    return a.astype(np.float64) @ b.astype(np.float64).T


# ---- linears -------------------------------------------------------------------------------------------


class WeightOnly:
    """Group-quantized weights, float activations ("gq")."""

    def __init__(self, w: GroupInt):
        self.w, self.shape = w, w.codes.shape
        self._dense = None

    def linear(self, x: np.ndarray) -> np.ndarray:
        if self._dense is None:
            self._dense = self.w.dequantize()
        return x @ self._dense.T


class W8A8:
    """int8 per-channel weights x int8 per-token activations -> int32, scaled back ("w8a8")."""

    def __init__(self, w: GroupInt):
        if w.bits != 8 or w.group != w.codes.shape[1] or not w.sym:
            raise GGUFError("w8a8 weights must be symmetric int8 per channel")
        self.w, self.shape = w, w.codes.shape

    def linear(self, x: np.ndarray) -> np.ndarray:
        q, s = quantize_act(x, 8)
        return (int_matmul(q, self.w.codes) * s * self.w.scale[:, 0]).astype(np.float32)


class Int8Mixed(W8A8):
    """LLM.int8() (Dettmers et al. 2022): activation columns holding any |x| > threshold are taken out and
    multiplied in float with the dequantized weight columns; the rest goes through int8 x int8."""

    def __init__(self, w: GroupInt, threshold: float):
        super().__init__(w)
        self.threshold = np.float32(threshold)

    def linear(self, x: np.ndarray) -> np.ndarray:
        cols = np.flatnonzero(np.abs(x).max(axis=0) > self.threshold)
        if not len(cols):
            return super().linear(x)
        regular = x.copy()
        regular[:, cols] = 0
        w_out = self.w.codes[:, cols].astype(np.float32) * self.w.scale  # (N, n_outliers)
        return super().linear(regular) + x[:, cols] @ w_out.T


class W4A4:
    """Atom (Zhao et al. 2024): channels reordered so the n_outlier largest-activation channels come last;
    those are int8 x int8, the others int4 x int4 in groups, both with per-token dynamic activation scales."""

    def __init__(
        self,
        perm: np.ndarray,
        normal: GroupInt,
        outlier: GroupInt | None,
        a_bits: int,
        a_group: int,
        a_clip: float,
    ):
        self.perm, self.normal, self.outlier = np.asarray(perm, np.int64), normal, outlier
        self.a_bits, self.a_group, self.a_clip = a_bits, a_group, a_clip
        self.n_normal = normal.codes.shape[1]
        self.shape = (normal.codes.shape[0], len(self.perm))

    def linear(self, x: np.ndarray) -> np.ndarray:
        xp = x[
            :, self.perm
        ]  # a fused kernel reads the channels in this order (the previous op writes them so)
        xn = xp[:, : self.n_normal]
        qx, sx = quantize_act(xn, self.a_bits, self.a_group, self.a_clip)  # (T, Kn), (T, Gx)
        w, g = self.normal, self.a_group
        if w.group != g:
            raise GGUFError(f"w4a4 weight group {w.group} differs from the activation group {g}")
        y = np.zeros((x.shape[0], w.codes.shape[0]), np.float64)
        for j in range(self.n_normal // g):
            part = slice(j * g, (j + 1) * g)
            y += int_matmul(qx[:, part], w.codes[:, part]) * sx[:, j : j + 1] * w.scale[:, j]
        if self.outlier is not None:
            qo, so = quantize_act(xp[:, self.n_normal :], 8)
            y += int_matmul(qo, self.outlier.codes) * so * self.outlier.scale[:, 0]
        return y.astype(np.float32)


# ---- quantized KV cache --------------------------------------------------------------------------------


class _QuantStore:
    """(n_ctx, G, Dh) of values kept as asymmetric `bits`-bit codes per (position, head, group of Dh), after
    an optional static per-(head, channel) shift and scale: codes of (x - shift) / scale, read back as
    decoded * scale + shift (K: see KVQuant)."""

    def __init__(self, n_ctx: int, n_head: int, dim: int, bits: int, group: int, shift=None, scale=None):
        self.bits, self.group = bits, group or dim
        self.codes = np.zeros((n_ctx, n_head, dim), np.uint8)
        self.scale = np.zeros((n_ctx, n_head, dim // self.group), np.float32)
        self.min = np.zeros_like(self.scale)
        self.shift = None if shift is None else np.asarray(shift, np.float32).reshape(n_head, dim)
        self.channel_scale = None if scale is None else np.asarray(scale, np.float32).reshape(n_head, dim)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """What is quantized: x (T, G, Dh) with the static shift and scale taken out (float32)."""
        x = x.astype(np.float32)
        if self.shift is not None:
            x = (x - self.shift) / self.channel_scale
        return x

    def decode(self, f: np.ndarray) -> np.ndarray:
        """Decoded codes f (S, G, Dh) back to the values' units."""
        return f * self.channel_scale + self.shift if self.shift is not None else f

    def __setitem__(self, rows: slice, x: np.ndarray) -> None:
        t, h, d = x.shape
        xg = self.encode(x).reshape(t, h, d // self.group, self.group)
        lo, hi = xg.min(axis=3), xg.max(axis=3)
        s = ((hi - lo) / np.float32(2**self.bits - 1)).astype(np.float16).astype(np.float32)
        m = lo.astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s[..., None] > 0, np.rint((xg - m[..., None]) / s[..., None]), 0)
        self.codes[rows] = np.clip(q, 0, 2**self.bits - 1).reshape(t, h, d)
        self.scale[rows], self.min[rows] = s, m

    def __getitem__(self, rows: slice) -> np.ndarray:
        c = self.codes[rows].astype(np.float32)
        t, h, d = c.shape
        c = c.reshape(t, h, d // self.group, self.group)
        f = (c * self.scale[rows][..., None] + self.min[rows][..., None]).reshape(t, h, d)
        return self.decode(f)


class QuantKVCache:
    """The numpy backend's KVCache interface with K and V held as low-bit codes (Atom's 4-bit KV cache)."""

    def __init__(
        self,
        n_layer,
        n_ctx,
        n_head_kv,
        head_dim_k,
        head_dim_v,
        bits: int,
        group: int,
        k_shift=None,
        k_scale=None,
    ):
        self.n_ctx, self.dtype = n_ctx, np.dtype(np.float32)
        for name, per_layer in (("shift", k_shift), ("scale", k_scale)):
            if per_layer is not None and (
                len(per_layer) != n_layer or any(np.size(a) != n_head_kv * head_dim_k for a in per_layer)
            ):
                raise GGUFError(
                    f"KV cache K {name}: expected {n_layer} layers of {n_head_kv} x {head_dim_k} values"
                )
        self.k = [
            _QuantStore(
                n_ctx,
                n_head_kv,
                head_dim_k,
                bits,
                group,
                None if k_shift is None else k_shift[i],
                None if k_scale is None else k_scale[i],
            )
            for i in range(n_layer)
        ]
        self.v = [_QuantStore(n_ctx, n_head_kv, head_dim_v, bits, group) for _ in range(n_layer)]


class KVQuant:
    """A quantized KV cache's settings. k_shift / k_scale: per layer (G, Dh) float32, calibrated offline
    (Atom, pyquant.kv.k_smooth): K is stored as codes of (K - shift) / scale. Qwen2's post-RoPE K has large
    per-channel offsets (the k_proj bias; its low-frequency RoPE channels barely rotate) that per-token 4-bit
    codes spend their range on; the shift removes them and the scale evens the channels' ranges. Measured on
    Qwen2.5-0.5B in float with only K quantized (WikiText-2 test, 4 chunks x 512; float PPL 24.68): plain
    per-token K4 PPL 29.25 KLD 0.452; shift + scale max|K - shift|^a: a = 0.5 KLD 0.043, 0.75 PPL 24.51 KLD
    0.037, 1 0.036 (PPL 25.13); K8 plain 0.026; V4 alone costs 0.007. Rejected there: a Hadamard rotation of
    each head's K (QuaRot; KLD 1.53 with V4 too: q's large channels are K's outlier channels, which plain
    per-token codes keep nearly exact as a group's min and max, and a rotation spreads error onto them),
    plain groups of 32 channels (K and V: KLD 0.458 vs 0.469 per head), the first tokens kept in float (no
    consistent gain)."""

    def __init__(self, bits: int, group: int, k_shift=None, k_scale=None):
        self.bits, self.group, self.k_shift, self.k_scale = bits, group, k_shift, k_scale

    def new_cache(self, n_layer, n_ctx, n_head_kv, head_dim_k, head_dim_v) -> QuantKVCache:
        dims = (n_layer, n_ctx, n_head_kv, head_dim_k, head_dim_v)
        return QuantKVCache(*dims, self.bits, self.group, self.k_shift, self.k_scale)


# ---- loading -------------------------------------------------------------------------------------------


class _BaseArchitecture:
    """A GGUFFile seen with its real architecture, for reading hyperparameters."""

    def __init__(self, f, arch: str):
        self._f, self.architecture = f, arch

    def __getattr__(self, name):
        return getattr(self._f, name)


class CompositeWeights:
    """The composite linears of a pyquant file, by GGUF weight name (`blk.0.attn_q.weight`)."""

    def __init__(self, f):
        self.f = f
        get = f.get
        self.format = f.require("pyquant.linear.format")
        if self.format not in ("gq", "w8a8", "int8_mixed", "w4a4"):
            raise GGUFError(f"{f.path}: unknown pyquant.linear.format {self.format!r}")
        self.file = _BaseArchitecture(f, f.require("pyquant.architecture"))
        self.bits, self.sym = int(get("pyquant.weight.bits", 8)), bool(get("pyquant.weight.sym", True))
        kv_bits = int(get("pyquant.kv.bits", 0))
        self.kv_quant = None
        if kv_bits:
            shift = scale = None
            n = sum(name.endswith(".kv_k_shift") for name in f.tensors)
            if n:
                shift = [f.tensor(f"blk.{i}.kv_k_shift").array().astype(np.float32) for i in range(n)]
                scale = [f.tensor(f"blk.{i}.kv_k_scale").array().astype(np.float32) for i in range(n)]
            self.kv_quant = KVQuant(kv_bits, int(get("pyquant.kv.group_size", 0)), shift, scale)

    def __contains__(self, name: str) -> bool:
        return name.endswith(".weight") and name.split(".")[-2] in LINEARS

    def __getitem__(self, name: str):
        f, base = self.f, name.removesuffix(".weight")
        w = GroupInt.read(f, base, self.bits, self.sym)
        if self.format == "gq":
            return WeightOnly(w)
        if self.format == "w8a8":
            return W8A8(w)
        if self.format == "int8_mixed":
            return Int8Mixed(w, float(f.require("pyquant.llm_int8.threshold")))
        outlier = GroupInt.read(f, base, 8, True, "outlier") if f"{base}.outlier" in f.tensors else None
        return W4A4(
            f.tensor(f"{base}.perm").array(),
            w,
            outlier,
            int(f.require("pyquant.act.bits")),
            int(f.require("pyquant.act.group_size")),
            float(f.get("pyquant.act.clip", 1.0)),
        )


def composite_weights(f) -> CompositeWeights | None:
    """The composite linears of a GGUF file written by `pyquant quantize`, or None for a plain file."""
    return CompositeWeights(f) if "pyquant.linear.format" in f.metadata else None
