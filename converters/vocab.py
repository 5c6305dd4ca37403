"""Tokenizer export: a Hugging Face tokenizer folder -> the tokenizer.ggml.* metadata llama.cpp reads.

Three sources, tried in llama.cpp's order (convert_hf_to_gguf.py: _set_vocab_sentencepiece, _set_vocab_gpt2):
- `tokenizer.model` (SentencePiece): model "llama", pre "default"; pieces, scores and types from the
  sentencepiece package, then overridden by added_tokens.json and tokenizer_config's added_tokens_decoder.
- `tokenizer.json` with a byte-level BPE (Qwen, Llama 3): model "gpt2", tokens by id (gaps as [PADi]),
  merges, and the pre-tokenizer name found by hashing the tokenization of llama.cpp's check string (chkhsh).
- `tokenizer.json` with a SentencePiece-style BPE (byte fallback, "▁" for spaces; Gemma 3 as transformers
  saves it): model "llama" like the SentencePiece case. Such a file has merges instead of scores; a piece's
  score is minus the rank of the first merge that builds it, which makes llama.cpp's SPM tokenizer (merge the
  adjacent pair whose result scores highest) pick the merges in the BPE's order.
Special token ids, add_bos/add_eos and the chat template come from gguf.SpecialVocab (tokenizer_config.json,
config.json), as in llama.cpp's converter.
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
from gguf import TokenType

from pyquant.errors import PyquantError

log = logging.getLogger(__name__)

# llama.cpp's get_vocab_base_pre: the check string and the hashes of its tokenization, per pre-tokenizer.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_PAD_PIECE = re.compile(r"\[PAD(\d+)\]")


def _is_padding(text: str, tid: int) -> bool:
    """llama.cpp's placeholder for an id the tokenizer lacks, "[PAD<id>]"; a checkpoint made from a GGUF file
    carries them as vocabulary entries, and they go back as UNUSED."""
    m = _PAD_PIECE.fullmatch(text)
    return m is not None and int(m.group(1)) == tid


def _looks_special(text: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens shaped like control markers count as control."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PyquantError(f"{path}: cannot read JSON: {e}") from None


def _apply_added_tokens(folder: Path, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """added_tokens.json and tokenizer_config.json's added_tokens_decoder override the base vocabulary."""
    n = len(tokens)
    if (folder / "added_tokens.json").is_file():
        for text, tid in _read_json(folder / "added_tokens.json").items():
            if tid < n:
                tokens[tid], scores[tid], types[tid] = text, -1000.0, TokenType.USER_DEFINED
    if (folder / "tokenizer_config.json").is_file():
        decoder = _read_json(folder / "tokenizer_config.json").get("added_tokens_decoder", {})
        for tid, entry in decoder.items():
            tid, text = int(tid), entry["content"]
            if tid >= n:
                continue
            if entry.get("special") or _looks_special(text):
                types[tid] = TokenType.CONTROL
            else:
                text = text.replace("▁", " ")  # llama.cpp expects user-defined tokens pre-normalized
                types[tid] = TokenType.USER_DEFINED
            tokens[tid], scores[tid] = text, -1000.0


def _pad(tokens: list, scores: list, types: list, n_vocab: int) -> None:
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)


def _sentencepiece(folder: Path, n_vocab: int) -> dict:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    if not sp.LoadFromFile(str(folder / "tokenizer.model")):
        raise PyquantError(f"{folder / 'tokenizer.model'}: not a SentencePiece model")
    size = sp.vocab_size()
    if size > n_vocab:
        raise PyquantError(f"tokenizer.model has {size} pieces, more than the model's vocab_size {n_vocab}")
    tokens, scores, types = [], [], []
    for i in range(size):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(
            TokenType.UNKNOWN
            if sp.IsUnknown(i)
            else TokenType.CONTROL
            if sp.IsControl(i)
            else TokenType.UNUSED
            if sp.IsUnused(i)
            else TokenType.BYTE
            if sp.IsByte(i)
            else TokenType.NORMAL
        )
    _pad(tokens, scores, types, n_vocab)
    _apply_added_tokens(folder, tokens, scores, types)
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": types}


def _is_byte_level(tj: dict) -> bool:
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _merges(tj: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in tj["model"].get("merges", [])]


def _spm_like_bpe(folder: Path, tj: dict, n_vocab: int) -> dict:
    vocab: dict[str, int] = tj["model"]["vocab"]
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise PyquantError(f"tokenizer.json has {size} tokens, more than the model's vocab_size {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, tid in vocab.items():
        tokens[tid] = text
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(_merges(tj)):
        rank.setdefault(a + b, r)
    scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
    types = [
        TokenType.BYTE
        if _BYTE_PIECE.fullmatch(t)
        else TokenType.UNUSED
        if _is_padding(t, i)
        else TokenType.NORMAL
        for i, t in enumerate(tokens)
    ]
    unk = tj["model"].get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = TokenType.UNKNOWN
    _pad(tokens, scores, types, n_vocab)
    for entry in tj.get("added_tokens", []):
        tid = entry["id"]
        if tid < n_vocab:
            special = entry.get("special") or _looks_special(entry["content"])
            tokens[tid] = entry["content"] if special else entry["content"].replace("▁", " ")
            scores[tid] = -1000.0
            types[tid] = TokenType.CONTROL if special else TokenType.USER_DEFINED
    _apply_added_tokens(folder, tokens, scores, types)
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": types}


def _hf_tokenizer(path: Path):
    """tokenizers' Tokenizer for a tokenizer.json, loaded once per file version (it takes ~0.5 s)."""
    return _load_hf_tokenizer(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=2)
def _load_hf_tokenizer(path: Path, mtime_ns: int):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def pre_tokenizer_name(tokenizer_json: Path) -> str:
    """llama.cpp's tokenizer.ggml.pre for a byte-level BPE: the hash of how it tokenizes CHKTXT."""
    ids = _hf_tokenizer(tokenizer_json).encode(CHKTXT).ids
    chkhsh = sha256(str(ids).encode()).hexdigest()
    if chkhsh not in PRE_TOKENIZERS:
        raise PyquantError(
            f"{tokenizer_json}: unrecognized BPE pre-tokenizer (chkhsh {chkhsh}); "
            f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
        )
    return PRE_TOKENIZERS[chkhsh]


def _byte_level_bpe(folder: Path, tj: dict, n_vocab: int) -> dict:
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {e["id"]: e for e in tj.get("added_tokens", [])}
    for tid, e in added.items():
        vocab[e["content"]] = tid
    if max(vocab.values()) >= n_vocab:
        raise PyquantError(f"tokenizer.json has token id {max(vocab.values())}, beyond vocab_size {n_vocab}")
    reverse = {tid: text for text, tid in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            text = reverse[i]
            if added[i].get("special") or _looks_special(text):
                types.append(TokenType.CONTROL)
            else:
                text = text.replace("▁", " ")
                types.append(TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(reverse[i])
            types.append(TokenType.UNUSED if _is_padding(reverse[i], i) else TokenType.NORMAL)
    return {
        "model": "gpt2",
        "pre": pre_tokenizer_name(folder / "tokenizer.json"),
        "tokens": tokens,
        "scores": None,
        "types": types,
        "merges": True,
    }


def _added_specials(folder: Path, ids: dict[str, int]) -> dict[str, bool]:
    """Whether the HF tokenizer puts BOS first / EOS last, read from what tokenizer.json actually does
    (its post-processor); llama.cpp's defaults differ by tokenizer model, so we always say."""
    if not (folder / "tokenizer.json").is_file():
        return {}
    enc = _hf_tokenizer(folder / "tokenizer.json").encode("a", add_special_tokens=True).ids
    return {"bos": bool(enc) and enc[0] == ids.get("bos"), "eos": bool(enc) and enc[-1] == ids.get("eos")}


STRING_ARRAY = (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
METADATA_TYPES = {gguf.Keys.Tokenizer.LIST: STRING_ARRAY, gguf.Keys.Tokenizer.MERGES: STRING_ARRAY}


def export_vocab(folder: Path, n_vocab: int, arch: str) -> dict:
    """GGUF tokenizer metadata (keys tokenizer.ggml.* and tokenizer.chat_template) for the HF folder."""
    if (folder / "tokenizer.model").is_file():
        v = _sentencepiece(folder, n_vocab)
    elif (folder / "tokenizer.json").is_file():
        tj = _read_json(folder / "tokenizer.json")
        if tj.get("model", {}).get("type") != "BPE":
            raise PyquantError(
                f"{folder / 'tokenizer.json'}: tokenizer model {tj.get('model', {}).get('type')!r} "
                "is not supported (BPE only)"
            )
        v = _byte_level_bpe(folder, tj, n_vocab) if _is_byte_level(tj) else _spm_like_bpe(folder, tj, n_vocab)
    else:
        raise PyquantError(f"{folder}: no tokenizer.model or tokenizer.json")

    special = gguf.SpecialVocab(folder, load_merges=bool(v.get("merges")), n_vocab=n_vocab)
    Keys = gguf.Keys.Tokenizer
    meta = {
        Keys.MODEL: v["model"],
        Keys.PRE: v["pre"],
        Keys.LIST: v["tokens"],
        Keys.TOKEN_TYPE: np.asarray(v["types"], dtype=np.int32),
    }
    if v["scores"] is not None:
        meta[Keys.SCORES] = np.asarray(v["scores"], dtype=np.float32)
    if v.get("merges"):
        if not special.merges:
            raise PyquantError(f"{folder / 'tokenizer.json'}: byte-level BPE without merges")
        meta[Keys.MERGES] = special.merges
    ids = {
        "bos": Keys.BOS_ID,
        "eos": Keys.EOS_ID,
        "unk": Keys.UNK_ID,
        "sep": Keys.SEP_ID,
        "pad": Keys.PAD_ID,
        "mask": Keys.MASK_ID,
        "eot": Keys.EOT_ID,
        "eom": Keys.EOM_ID,
    }
    for typ, tid in special.special_token_ids.items():
        if typ in ids:
            meta[ids[typ]] = int(tid)
    adds = {"bos": Keys.ADD_BOS, "eos": Keys.ADD_EOS, "sep": Keys.ADD_SEP}
    found = {**_added_specials(folder, special.special_token_ids), **special.add_special_token}
    for typ, value in found.items():
        if typ in adds:
            meta[adds[typ]] = bool(value)
    if arch == "gemma3" and v["model"] == "llama":
        meta[Keys.ADD_PREFIX] = False
    if isinstance(special.chat_template, str):
        meta[Keys.CHAT_TEMPLATE] = special.chat_template
    return meta
