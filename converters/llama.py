"""llama and mistral (HF model_type "llama", "mistral") -> GGUF architecture "llama".

llama.cpp's "llama" graph applies RoPE to interleaved pairs (x0, x1), (x2, x3), ...; HF's LlamaAttention
rotates halves (x_i, x_{i + head_dim/2}). So the rows of q_proj and k_proj (and their biases) are permuted per
head, as llama.cpp's convert_hf_to_gguf.py LlamaModel.permute does: rows (2, head_dim/2) -> (head_dim/2, 2).
Llama 3 "llama3" RoPE scaling becomes a rope_freqs tensor of per-frequency divisors (written by hf_to_gguf).
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from .tensor_map import Architecture, head_dim, llama_family_hparams, rope_parameters

BLOCK = (
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """(n_head * head_dim, ...) rows from rotate-half order to interleaved pairs, head by head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def fix(name: str, x: np.ndarray, cfg: dict) -> np.ndarray:
    n_head = cfg["num_attention_heads"]
    if ".attn_q." in name:
        return permute(x, n_head)
    if ".attn_k." in name:
        return permute(x, cfg.get("num_key_value_heads") or n_head)
    return x


def hparams(cfg: dict) -> dict:
    meta = llama_family_hparams("llama", cfg)
    meta["llama.vocab_size"] = int(cfg["vocab_size"])
    meta["llama.rope.dimension_count"] = int(head_dim(cfg))
    if cfg.get("sliding_window"):  # mistral v0.1; llama.cpp's llama graph does not use it but keeps the key
        meta["llama.attention.sliding_window"] = int(cfg["sliding_window"])
    return meta


def rope_freqs(cfg: dict) -> np.ndarray | None:
    """Llama 3.1 RoPE scaling as llama.cpp stores it: one divisor per rotary frequency (float32, head_dim/2)."""
    rope = rope_parameters(cfg)
    if rope["rope_type"] != "llama3":
        return None
    base, dim = rope["rope_theta"], head_dim(cfg)
    factor, low, high = (
        rope.get("factor", 8.0),
        rope.get("low_freq_factor", 1.0),
        rope.get("high_freq_factor", 4.0),
    )
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


ARCH = Architecture(
    "llama", ("llama", "mistral"), gguf.MODEL_ARCH.LLAMA, BLOCK, hparams, fix, tied_default=False
)
