"""qwen2 (HF model_type "qwen2") -> GGUF architecture "qwen2": llama's layout plus q/k/v biases.

llama.cpp's qwen2 graph uses NEOX-style RoPE (rotate halves), the same as HF, so no row permutation.
"""

from __future__ import annotations

import gguf

from .llama import BLOCK
from .tensor_map import Architecture, llama_family_hparams, no_fix


def hparams(cfg: dict) -> dict:
    return llama_family_hparams("qwen2", cfg)


ARCH = Architecture(
    "qwen2",
    ("qwen2",),
    gguf.MODEL_ARCH.QWEN2,
    BLOCK + ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    hparams,
    no_fix,
    tied_default=False,
)
