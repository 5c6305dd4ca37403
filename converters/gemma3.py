"""gemma3 (HF model_type "gemma3_text", or "gemma3" with a text_config) -> GGUF architecture "gemma3".

Differences from llama, as llama.cpp's convert_hf_to_gguf.py Gemma3Model writes them:
- Gemma3RMSNorm scales by (1 + w); GGUF stores w + 1 for every *norm.weight (q/k norms included).
- q/k RMS norms, and norms after attention and after the MLP (post_attention_norm, post_ffw_norm).
- head_dim is its own hyperparameter (key_length/value_length always written), a sliding window on 5 of 6
  layers (llama.cpp fixes the pattern and the local RoPE base 10000), optional final logit softcapping.
- NEOX RoPE like HF: no row permutation. Embeddings are tied by default.
"""

from __future__ import annotations

import gguf
import numpy as np

from .tensor_map import Architecture, llama_family_hparams

BLOCK = (
    "attn_norm.weight",
    "attn_q.weight",
    "attn_q_norm.weight",
    "attn_k.weight",
    "attn_k_norm.weight",
    "attn_v.weight",
    "attn_output.weight",
    "post_attention_norm.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
    "post_ffw_norm.weight",
)
DEFAULTS = {
    "max_position_embeddings": 131072,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
}


def fix(name: str, x: np.ndarray, cfg: dict) -> np.ndarray:
    return x + np.float32(1.0) if name.endswith("norm.weight") else x


def hparams(cfg: dict) -> dict:
    cfg = {**DEFAULTS, **cfg}
    meta = llama_family_hparams("gemma3", cfg, always_head_dim=True)
    if cfg.get("final_logit_softcapping"):
        meta["gemma3.final_logit_softcapping"] = float(cfg["final_logit_softcapping"])
    if cfg.get("sliding_window") and cfg.get("sliding_window_pattern") != 1:
        meta["gemma3.attention.sliding_window"] = int(cfg["sliding_window"])
    return meta


ARCH = Architecture(
    "gemma3", ("gemma3_text", "gemma3"), gguf.MODEL_ARCH.GEMMA3, BLOCK, hparams, fix, tied_default=True
)
