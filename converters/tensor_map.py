"""Hugging Face tensor names -> GGUF tensor names, and the architecture record every converter fills in.

Names go through gguf.TensorNameMap (gguf-py's per-architecture table, the one llama.cpp's converter uses),
after stripping the prefixes multimodal wrappers add (Gemma3ForConditionalGeneration keeps its text model
under `language_model.`). An architecture is data: which HF model_types it converts, its GGUF name, the
tensors every block must have, its hyperparameters as GGUF metadata, and a per-tensor fix-up (Q/K row
permutation, norm offset).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from pyquant.errors import PyquantError

SKIPPED = ("rotary_emb.inv_freq", "vision_tower.", "vision_model.", "multi_modal_projector.")
PREFIXES = {  # wrapper prefix -> the plain causal-LM prefix
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}


@dataclass(frozen=True)
class Architecture:
    name: str  # GGUF general.architecture
    model_types: tuple[str, ...]  # HF config.json model_type values converted by this architecture
    gguf_arch: gguf.MODEL_ARCH
    block_tensors: tuple[str, ...]  # GGUF names (after "blk.N.") every block must have
    hparams: Callable[[dict], dict]  # HF text config -> GGUF metadata ({arch}.* keys)
    fix: Callable[
        [str, np.ndarray, dict], np.ndarray
    ]  # (GGUF name, tensor, config) -> tensor as GGUF stores it
    tied_default: bool  # tie_word_embeddings when config.json does not say


def no_fix(name: str, x: np.ndarray, cfg: dict) -> np.ndarray:
    return x


class TensorMap:
    def __init__(self, arch: Architecture, n_blocks: int):
        self.arch, self.n_blocks = arch, n_blocks
        self._map = gguf.get_tensor_name_map(arch.gguf_arch, n_blocks)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name for an HF tensor; None for tensors llama.cpp does not use (rotary caches, vision)."""
        if any(s in hf_name for s in SKIPPED):
            return None
        for old, new in PREFIXES.items():
            if hf_name.startswith(old):
                hf_name = new + hf_name[len(old) :]
                break
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PyquantError(f"tensor {hf_name!r} has no GGUF name for architecture {self.arch.name}")
        return name

    def hf_name_hint(self, gguf_name: str) -> str:
        """An HF name that maps to `gguf_name`, for error messages (`model.layers.1.self_attn.q_proj.weight`)."""
        base, _, suffix = gguf_name.rpartition(".")
        keys = [k for k, (_, n) in self._map.mapping.items() if n == base]
        best = next((k for k in keys if k.startswith("model.")), keys[0] if keys else base)
        return f"{best}.{suffix}"

    def required(self, tied: bool) -> list[str]:
        """GGUF names the converted file must hold, in the order we write them."""
        names = ["token_embd.weight"]
        for i in range(self.n_blocks):
            names += [f"blk.{i}.{t}" for t in self.arch.block_tensors]
        names.append("output_norm.weight")
        if not tied:
            names.append("output.weight")
        return names


# ---- hyperparameters shared by the llama family -------------------------------------------------------------


def rope_parameters(cfg: dict, layer_type: str = "full_attention") -> dict:
    """RoPE settings of one attention kind, from transformers 5 `rope_parameters` (flat, or per layer type) or
    the older `rope_theta` + `rope_scaling` keys; always has rope_theta and rope_type."""
    rp = dict(cfg.get("rope_scaling") or {})
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    rp.update({k: v for k, v in params.items() if not isinstance(v, dict)})
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    return rp


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def llama_family_hparams(arch: str, cfg: dict, always_head_dim: bool = False) -> dict:
    """The {arch}.* keys llama.cpp reads for llama-like models, with its value types (u32, f32)."""
    n_head = cfg["num_attention_heads"]
    meta = {
        f"{arch}.context_length": int(cfg.get("max_position_embeddings", 2048)),
        f"{arch}.embedding_length": int(cfg["hidden_size"]),
        f"{arch}.block_count": int(cfg["num_hidden_layers"]),
        f"{arch}.feed_forward_length": int(cfg["intermediate_size"]),
        f"{arch}.attention.head_count": int(n_head),
        f"{arch}.attention.head_count_kv": int(cfg.get("num_key_value_heads") or n_head),
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
    }
    rope = rope_parameters(cfg)
    meta[f"{arch}.rope.freq_base"] = float(rope["rope_theta"])
    hd = head_dim(cfg)
    if always_head_dim or hd != cfg["hidden_size"] // n_head:
        meta[f"{arch}.attention.key_length"] = int(hd)
        meta[f"{arch}.attention.value_length"] = int(hd)
    meta.update(rope_scaling(arch, rope))
    return meta


def rope_scaling(arch: str, rope: dict) -> dict:
    """rope.scaling.* for linear and YaRN scaling (llama3 scaling is a rope_freqs tensor, see llama.py)."""
    kind = rope["rope_type"]
    if kind in ("default", "llama3") or not rope.get("factor"):
        return {}
    if kind not in ("linear", "yarn"):
        raise PyquantError(f"rope scaling type {kind!r} is not supported (linear, yarn, llama3)")
    meta = {f"{arch}.rope.scaling.type": kind, f"{arch}.rope.scaling.factor": float(rope["factor"])}
    if kind == "yarn":
        if "original_max_position_embeddings" in rope:
            meta[f"{arch}.rope.scaling.original_context_length"] = int(
                rope["original_max_position_embeddings"]
            )
        for key, gkey in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if rope.get(key) is not None:
                meta[f"{arch}.rope.scaling.{gkey}"] = float(rope[key])
    return meta
