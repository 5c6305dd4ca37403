"""Hugging Face checkpoints to convert, made offline and cached under ~/.cache/pyquant/hf/.

- `real_checkpoint("qwen" | "gemma")`: the real GGUF models turned back into HF checkpoints by transformers'
  own GGUF loader (`from_pretrained(dir, gguf_file=...)`: dequantized weights, norms and Q/K layouts undone
  by transformers, not by us), saved as bf16 safetensors with the tokenizer transformers builds from the GGUF.
- `random_checkpoint(arch, **config)`: tiny random-weight checkpoints (2-6 layers, hidden 128-256) of llama,
  mistral, qwen2 and gemma3, with every parameter random (norm weights, biases too) so that a wrong mapping,
  permutation or norm offset shows in the logits. Tokenizers: a SentencePiece BPE model trained here on
  WikiText for llama/mistral, the real Qwen and Gemma tokenizers for qwen2/gemma3.

Every folder is built in a temp folder beside its target and renamed into place, so a cache entry is complete
or absent. transformers and torch are imported only inside the builders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pyquant.errors import PyquantError

WIKITEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2"

# architecture -> (transformers config class, tokenizer source, weights format, dtype, default tiny config)
_TINY = {
    "llama": (
        "LlamaConfig",
        "spm",
        "safetensors",
        "float32",
        {
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        },
    ),
    "mistral": (
        "MistralConfig",
        "spm",
        "bin",
        "float16",
        {
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
        },
    ),
    "qwen2": (
        "Qwen2Config",
        "qwen",
        "safetensors",
        "bfloat16",
        {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "gemma",
        "safetensors",
        "float32",
        {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 6,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 48,
            "query_pre_attn_scalar": 48,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6,
            "sliding_window": 16,
            "tie_word_embeddings": True,
        },
    ),
}
ARCHITECTURES = tuple(_TINY)
RECIPE = 2  # bump when the way tiny checkpoints are made changes (it is part of their cache key)


def cache_root() -> Path:
    return Path(os.environ.get("PYQUANT_CACHE", Path.home() / ".cache" / "pyquant")) / "hf"


@contextmanager
def _building(target: Path):
    """A temp folder that becomes `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _save_tokenizer_from_gguf(name: str, out: Path) -> None:
    from transformers import AutoTokenizer

    from pyquant.models import model_path

    path = model_path(name)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(out))


def real_tokenizer(name: str) -> Path:
    """The tokenizer transformers builds from a real GGUF model ("qwen", "gemma"), saved HF-style."""
    target = cache_root() / "tokenizers" / name
    if not (target / "tokenizer_config.json").exists():
        with _building(target) as tmp:
            _save_tokenizer_from_gguf(name, tmp)
    return target


def real_checkpoint(name: str) -> Path:
    """The real GGUF model `name` ("qwen", "gemma") as a bf16 safetensors HF checkpoint (built once, ~minutes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pyquant.models import model_path

    target = cache_root() / f"real-{name}"
    if (target / "config.json").exists():
        return target
    path = model_path(name)
    with _building(target) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        model.config.quantization_config = None  # the weights are dequantized; the checkpoint is plain
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        shutil.copytree(real_tokenizer(name), tmp, dirs_exist_ok=True)
    return target


def spm_tokenizer(vocab_size: int = 1000) -> Path:
    """A SentencePiece BPE model (byte fallback, llama-style <unk> <s> </s>, one extra control piece) trained on
    WikiText valid, with the tokenizer_config.json a Llama checkpoint carries."""
    target = cache_root() / "tokenizers" / f"spm-{vocab_size}"
    if (target / "tokenizer.model").exists():
        return target
    import sentencepiece as spm

    with _building(target) as tmp:
        spm.SentencePieceTrainer.train(
            input=str(WIKITEXT / "valid.txt"),
            model_prefix=str(tmp / "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            num_threads=2,
            minloglevel=2,
            control_symbols=["<|end|>"],
        )
        (tmp / "tokenizer.vocab").unlink()
        decoder = {
            str(i): {
                "content": t,
                "special": True,
                "normalized": False,
                "lstrip": False,
                "rstrip": False,
                "single_word": False,
            }
            for i, t in enumerate(("<unk>", "<s>", "</s>", "<|end|>"))
        }
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
            "added_tokens_decoder": decoder,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return target


def _tokenizer_dir(source: str) -> Path:
    return spm_tokenizer() if source == "spm" else real_tokenizer(source)


def _vocab_and_specials(folder: Path) -> tuple[int, dict[str, int]]:
    """(number of ids, {bos/eos/pad: id}) of a tokenizer folder, read without transformers."""
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if (folder / "tokenizer.model").exists():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.LoadFromFile(str(folder / "tokenizer.model"))
        size, ids = sp.vocab_size(), {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    else:
        tj = json.loads((folder / "tokenizer.json").read_text())
        ids = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
        size = max(ids.values()) + 1
    specials = {
        f"{k}_token_id": ids[v] for k in ("bos", "eos", "pad") if (v := tok_cfg.get(f"{k}_token")) in ids
    }
    return size, specials


def _randomize(model, gemma_norms: bool, seed: int) -> None:
    """Every parameter random: matrices ~ N(0, 1/n_cols), biases ~ N(0, 1/4), norms around their identity."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                base = 0.0 if gemma_norms else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:  # embeddings too: rows of norm ~1, so tied logits stay O(1)
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def random_checkpoint(arch: str, seed: int = 0, **config) -> Path:
    """A tiny random-weight checkpoint of `arch` (llama, mistral, qwen2, gemma3); `config` overrides the tiny
    defaults. Cached by (arch, seed, config)."""
    import torch
    import transformers

    if arch not in _TINY:
        raise PyquantError(f"no tiny checkpoint recipe for {arch!r}; known: {', '.join(ARCHITECTURES)}")
    cls_name, tok_source, fmt, dtype, defaults = _TINY[arch]
    cfg_kwargs = {**defaults, **config}
    key = hashlib.sha256(json.dumps([RECIPE, arch, seed, cfg_kwargs], sort_keys=True).encode()).hexdigest()[
        :10
    ]
    target = cache_root() / f"tiny-{arch}-{key}"
    if (target / "config.json").exists():
        return target
    tok_dir = _tokenizer_dir(tok_source)
    n_ids, specials = _vocab_and_specials(tok_dir)
    vocab_size = cfg_kwargs.pop("vocab_size", None) or (151936 if tok_source == "qwen" else n_ids)
    cfg = getattr(transformers, cls_name)(vocab_size=vocab_size, **specials, **cfg_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, gemma_norms=arch == "gemma3", seed=seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    with _building(target) as tmp:
        model = model.to(getattr(torch, dtype))
        model.save_pretrained(str(tmp))
        if fmt == "bin":  # transformers 5 writes safetensors only; a .bin checkpoint is a pickled state dict
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            if cfg.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            torch.save(state, tmp / "pytorch_model.bin")
            (tmp / "model.safetensors").unlink()
        for f in tok_dir.iterdir():
            shutil.copy(f, tmp / f.name)
    return target
