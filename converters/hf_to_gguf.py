"""`pyquant convert HF_DIR -o OUT.gguf --type TYPE`: a Hugging Face checkpoint folder to a GGUF file llama.cpp loads.

The steps, each in its own module:
1. config.json -> an Architecture (llama.py, qwen2.py, gemma3.py) and its GGUF hyperparameters;
2. the tokenizer folder -> tokenizer.ggml.* metadata (vocab.py);
3. every checkpoint tensor -> its GGUF name (tensor_map.py), checked against the tensors each block needs;
4. per-tensor ggml types for the file type, llama.cpp's mixture rules (mixtures.py);
5. a streaming write (pyquant.gguf.write_gguf): each tensor is read from the memory-mapped checkpoint
   (safetensors_io.py), fixed up (Q/K permutation, norm offset), quantized with pyquant.quants and written
   before the next is read, into a temp file renamed over OUT only at the end.
Peak memory is about one tensor in float32 plus its quantized bytes, not the model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from pyquant.errors import PyquantError
from pyquant.gguf.writer import TensorSpec, write_gguf
from pyquant.quants import quantize, row_bytes

from . import gemma3, llama, qwen2
from .mixtures import FILE_TYPES, tensor_types
from .safetensors_io import TensorSource
from .tensor_map import Architecture, TensorMap
from .vocab import METADATA_TYPES, export_vocab

log = logging.getLogger(__name__)

ARCHITECTURES: tuple[Architecture, ...] = (llama.ARCH, qwen2.ARCH, gemma3.ARCH)
BY_MODEL_TYPE = {mt: a for a in ARCHITECTURES for mt in a.model_types}


def load_config(folder: Path) -> tuple[dict, Architecture]:
    """The text model's config.json (a multimodal wrapper's text_config merged in) and its architecture."""
    if not folder.is_dir():
        raise PyquantError(f"{folder}: not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise PyquantError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PyquantError(f"{path}: not valid JSON: {e}") from None
    model_type = cfg.get("model_type")
    if model_type not in BY_MODEL_TYPE:
        raise PyquantError(
            f"{path}: unsupported architecture {model_type!r}; supported model_types: {', '.join(BY_MODEL_TYPE)}"
        )
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**{k: v for k, v in cfg.items() if k != "text_config"}, **cfg["text_config"]}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in cfg and not (model_type.startswith("gemma3") and key == "num_attention_heads"):
            raise PyquantError(f"{path}: missing {key!r}")
    return cfg, BY_MODEL_TYPE[model_type]


# Tensors whose rows are independent (one per token), read and quantized a block of rows at a time: the
# vocabulary matrices are the largest tensors of small models, and in float32 several times their file size.
ROW_WISE = ("token_embd.weight", "output.weight")
CHUNK_VALUES = 1 << 22


def _quantize_in_row_blocks(source, hf_name, g, shape, qtype, arch, cfg) -> np.ndarray:
    out = np.empty((shape[0], row_bytes(qtype, shape[1])), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // shape[1])
    for r in range(0, shape[0], step):
        block = slice(r, min(r + step, shape[0]))
        out[block] = quantize(arch.fix(g, source.load(hf_name, block), cfg), qtype)
    return out


def _file_order(names, required: list[str]) -> list[str]:
    """token_embd, rope_freqs, then block by block (the architecture's order, extras last), output_norm, output."""
    head = ("token_embd.weight", "rope_freqs.weight")
    tail = ("output_norm.weight", "output.weight")
    rank = {g: i for i, g in enumerate(required)}

    def key(g: str) -> tuple:
        if g in head or g in tail:
            return (0 if g in head else 2, (head + tail).index(g), 0, g)
        m = re.match(r"blk\.(\d+)\.", g)
        return (1, int(m.group(1)) if m else -1, rank.get(g, len(rank)), g)

    return sorted(names, key=key)


@dataclass
class Plan:
    arch: Architecture
    cfg: dict
    metadata: dict
    specs: list[TensorSpec]
    source: TensorSource


def plan(folder: str | Path, file_type: str = "f16", name: str | None = None) -> Plan:
    """Everything about the output except the tensor bytes: metadata, names, shapes, types, producers."""
    folder = Path(folder)
    if file_type not in FILE_TYPES:
        raise PyquantError(f"unknown --type {file_type!r}; choose one of: {', '.join(FILE_TYPES)}")
    cfg, arch = load_config(folder)
    source = TensorSource(folder)
    n_blocks = int(cfg["num_hidden_layers"])
    tmap = TensorMap(arch, n_blocks)
    tied = bool(cfg.get("tie_word_embeddings", arch.tied_default))

    hf_of: dict[str, str] = {}  # GGUF name -> HF name
    for hf_name in source.names():
        g = tmap.gguf_name(hf_name)
        if g is None or (tied and g == "output.weight"):
            continue
        if g in hf_of:
            raise PyquantError(f"{folder}: tensors {hf_of[g]!r} and {hf_name!r} both map to {g!r}")
        hf_of[g] = hf_name
    required = tmap.required(tied)
    for g in required:
        if g not in hf_of:
            raise PyquantError(f"{folder}: missing tensor {tmap.hf_name_hint(g)!r} (GGUF {g})")

    vocab = export_vocab(folder, int(cfg["vocab_size"]), arch.name)
    n_vocab = len(vocab[gguf.Keys.Tokenizer.LIST])
    rows = source.shape(hf_of["token_embd.weight"])[0]
    if rows < n_vocab:
        raise PyquantError(f"{folder}: embedding has {rows} rows for {n_vocab} tokens")

    shapes = {g: source.shape(h) for g, h in hf_of.items()}
    shapes["token_embd.weight"] = (n_vocab, *shapes["token_embd.weight"][1:])
    extra = {}
    if arch is llama.ARCH and (freqs := llama.rope_freqs(cfg)) is not None:
        extra["rope_freqs.weight"] = freqs
        shapes["rope_freqs.weight"] = freqs.shape
    types = tensor_types(file_type, shapes, n_blocks)

    def producer(g: str):
        def produce() -> np.ndarray:
            if g in extra:
                return quantize(extra[g], types[g])
            if g in ROW_WISE and math.prod(shapes[g]) > CHUNK_VALUES:
                return _quantize_in_row_blocks(source, hf_of[g], g, shapes[g], types[g], arch, cfg)
            x = arch.fix(g, source.load(hf_of[g]), cfg)
            return quantize(x[: shapes[g][0]], types[g])

        return produce

    specs = [TensorSpec(g, types[g], shapes[g], producer(g)) for g in _file_order(shapes, required)]

    metadata = {
        "general.architecture": arch.name,
        "general.type": "model",
        "general.name": name
        or str(cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or folder.resolve().name),
        **arch.hparams(cfg),
        "general.file_type": int(FILE_TYPES[file_type][0]),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        **vocab,
    }
    return Plan(arch, cfg, metadata, specs, source)


def convert(
    folder: str | Path, output: str | Path, file_type: str = "f16", progress=None, name: str | None = None
) -> Path:
    """Convert the HF checkpoint in `folder` to the GGUF file `output`; returns its path."""
    p = plan(folder, file_type, name)
    return write_gguf(output, p.metadata, p.specs, types=METADATA_TYPES, progress=progress)


# ---- command line ---------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument(
        "hf_dir", help="Hugging Face checkpoint folder (config.json, safetensors or .bin, tokenizer)"
    )
    p.add_argument("-o", "--output", required=True, help="GGUF file to write (replaced atomically)")
    p.add_argument("--type", default="f16", choices=list(FILE_TYPES), help="file type (default f16)")
    p.add_argument("--name", help="general.name (default: from config.json or the folder name)")


class _Bar:
    """A one-line progress bar on stderr, redrawn only on a terminal."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.t0, self.tty = stream, time.time(), stream.isatty()

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.tty:
            return
        width = 30
        fill = width * done // total
        line = f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {time.time() - self.t0:5.1f}s {name[:40]:<40}"
        self.stream.write(line)
        self.stream.flush()
        if done == total:
            self.stream.write("\n")


def run(args) -> int:
    t0 = time.time()
    p = plan(Path(args.hf_dir), args.type, args.name)
    out = write_gguf(args.output, p.metadata, p.specs, types=METADATA_TYPES, progress=_Bar())
    size = out.stat().st_size
    print(
        f"pyquant: wrote {out} ({p.arch.name}, {args.type}, {len(p.specs)} tensors, {size / 2**20:.1f} MiB) "
        f"in {time.time() - t0:.1f}s",
        file=sys.stderr,
    )
    return 0
