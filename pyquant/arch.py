"""Architectures as data: one row of flags per GGUF `general.architecture`, and the hyperparameters read
from metadata. The forward pass (model.py) is written once and reads only these.

Sources: llama.cpp's src/llama-model.cpp (hyperparameter keys, rope types, Gemma 3's sliding-window pattern
and rope bases) and the Hugging Face modeling files of each family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import GGUFError
from .gguf import GGUFFile


@dataclass(frozen=True)
class ArchFlags:
    rope_neox: bool  # rotate pairs (i, i + n/2) instead of (2i, 2i+1)
    activation: str  # "swiglu" | "geglu"
    embed_scale: bool = False  # multiply embeddings by sqrt(n_embd) (Gemma)
    post_norms: bool = False  # extra RMSNorm on attention and FFN outputs (Gemma 2/3)
    swa_pattern: int = 0  # every n-th layer is global, the others slide (Gemma 3: 6); 0: none
    swa_rope_base: float = 0.0  # rope base of sliding layers (Gemma 3: 10000)


ARCHITECTURES = {
    "llama": ArchFlags(rope_neox=False, activation="swiglu"),
    "qwen2": ArchFlags(rope_neox=True, activation="swiglu"),
    "gemma3": ArchFlags(rope_neox=True, activation="geglu", embed_scale=True, post_norms=True, swa_pattern=6,
                        swa_rope_base=10000.0),
}


@dataclass(frozen=True)
class HParams:
    arch: str
    flags: ArchFlags
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    n_ff: int
    eps: float
    rope_base: float
    rope_freq_scale: float
    sliding_window: int
    attn_scale: float

    def layer_window(self, layer: int) -> int:
        """Attention window of a layer in tokens (0: full causal)."""
        p = self.flags.swa_pattern
        if not p or not self.sliding_window:
            return 0
        return self.sliding_window if layer % p < p - 1 else 0

    def layer_rope(self, layer: int) -> tuple[float, float]:
        """(base, freq_scale) of a layer: Gemma 3's sliding layers use their own base and no scaling."""
        if self.layer_window(layer) and self.flags.swa_rope_base:
            return self.flags.swa_rope_base, 1.0
        return self.rope_base, self.rope_freq_scale


def _scalar(value) -> int:
    # per-layer arrays (some GGUFs store head_count_kv per layer) are uniform in the models we run
    if hasattr(value, "__len__"):
        if len(set(int(v) for v in value)) != 1:
            raise GGUFError("per-layer head counts that differ between layers are not supported")
        return int(value[0])
    return int(value)


def read_hparams(f: GGUFFile) -> HParams:
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")

    def req(key):
        return f.require(f"{arch}.{key}")

    def opt(key, default):
        return f.get(f"{arch}.{key}", default)

    n_embd = int(req("embedding_length"))
    n_head = _scalar(req("attention.head_count"))
    head_dim_k = int(opt("attention.key_length", n_embd // n_head))
    scaling = opt("rope.scaling.type", "none")
    factor = float(opt("rope.scaling.factor", 1.0) or 1.0)
    freq_scale = 1.0 / factor if scaling == "linear" and factor else 1.0
    tokens = f.require("tokenizer.ggml.tokens")
    return HParams(
        arch=arch,
        flags=ARCHITECTURES[arch],
        n_vocab=len(tokens),
        n_ctx_train=int(req("context_length")),
        n_embd=n_embd,
        n_layer=int(req("block_count")),
        n_head=n_head,
        n_head_kv=_scalar(opt("attention.head_count_kv", n_head)),
        head_dim_k=head_dim_k,
        head_dim_v=int(opt("attention.value_length", n_embd // n_head)),
        n_rot=int(opt("rope.dimension_count", head_dim_k)),
        n_ff=_scalar(req("feed_forward_length")),
        eps=float(req("attention.layer_norm_rms_epsilon")),
        rope_base=float(opt("rope.freq_base", 10000.0)),
        rope_freq_scale=freq_scale,
        sliding_window=int(opt("attention.sliding_window", 0)),
        attn_scale=1.0 / math.sqrt(head_dim_k),
    )
