"""Tokenizer: GGUF tokenizer metadata -> encode/decode identical to llama.cpp's (src/llama-vocab.cpp).

Two vocabulary types, as `tokenizer.ggml.model` names them:
- "gpt2": byte-level BPE. Text is cut into words by the pre-tokenizer regexes of `tokenizer.ggml.pre`
  (pretokenize.py), each word is spelled in GPT-2's byte alphabet and merged by `tokenizer.ggml.merges` rank.
- "llama": SentencePiece-style BPE (llm_tokenizer_spm). Spaces become "▁" (plus one in front when
  `add_space_prefix`), and adjacent symbols merge while their concatenation is a token, best score first;
  characters no token covers fall back to `<0xXX>` byte tokens. Gemma 3 uses this with its 262k vocabulary.
Both first cut special tokens out of the text (specials.py). Words (BPE) and runs between safe boundaries
(SPM, see `_spm_boundary`) are tokenized once and cached, which makes a 1 MB text a matter of seconds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import numpy as np

from ..errors import PyquantError
from .merge import merge
from .pretokenize import PreTokenizer, Splitter, pre_tokenizer
from .specials import SPECIAL, TYPE_TO_ATTR, Attr, SpecialSplitter, special_ids, strip_attrs
from .unicode import CHAR_TO_BYTE, byte_encode

log = logging.getLogger(__name__)

K = "tokenizer.ggml."
# id kind -> metadata key (deprecated spellings after the current ones, as llama.cpp reads them)
ID_KEYS = {
    "bos": ["bos_token_id"],
    "eos": ["eos_token_id"],
    "eot": ["eot_token_id"],
    "eom": ["eom_token_id"],
    "unk": ["unknown_token_id"],
    "sep": ["seperator_token_id"],
    "pad": ["padding_token_id"],
    "mask": ["mask_token_id"],
    "fim_pre": ["fim_pre_token_id", "prefix_token_id"],
    "fim_suf": ["fim_suf_token_id", "suffix_token_id"],
    "fim_mid": ["fim_mid_token_id", "middle_token_id"],
    "fim_pad": ["fim_pad_token_id"],
    "fim_rep": ["fim_rep_token_id"],
    "fim_sep": ["fim_sep_token_id"],
}
DEFAULT_IDS = {"llama": {"bos": 1, "eos": 2, "unk": 0}, "gpt2": {"bos": 11, "eos": 11}}
_CACHE_LIMIT = 1 << 18  # cached words before the cache starts over
_ASCII_SPACE = b" "


class Tokenizer:
    """A llama.cpp-identical tokenizer. Token ids are ints; absent special ids are None."""

    def __init__(self, meta: dict):
        model = meta.get(K + "model")
        if model not in DEFAULT_IDS:
            raise PyquantError(f"tokenizer.ggml.model {model!r} is not supported (supported: gpt2, llama)")
        self.model = model
        tokens = meta.get(K + "tokens")
        if tokens is None or len(tokens) == 0:
            raise PyquantError("tokenizer.ggml.tokens is missing or empty")
        self.texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(_strings(tokens))]
        n = len(self.texts)
        self.token_to_id = {text: i for i, text in enumerate(self.texts)}
        self.scores = _numbers(meta, K + "scores", n, np.float32, 0.0)
        types = _numbers(meta, K + "token_type", n, np.int64, 1)
        self.attrs = [TYPE_TO_ATTR.get(t, 0) for t in types]

        if model == "llama":
            self.pre = None
            self.add_space_prefix, self.clean_spaces, self.ignore_merges = True, False, False
            self.add_bos, self.add_eos = True, False
        else:
            name = meta.get(K + "pre") or "default"
            if not meta.get(K + "pre"):
                log.warning("tokenizer.ggml.pre is missing: using 'default' (tokenization may be degraded)")
            self.pre: PreTokenizer | None = pre_tokenizer(name)
            self.add_space_prefix, self.clean_spaces = False, self.pre.clean_spaces
            self.ignore_merges, self.add_bos, self.add_eos = self.pre.ignore_merges, self.pre.add_bos, False
            self._splitter = Splitter(self.pre.regexes)
            self._ranks = _merge_ranks(meta)
        self.add_space_prefix = bool(meta.get(K + "add_space_prefix", self.add_space_prefix))

        ids = {kind: DEFAULT_IDS[model].get(kind, -1) for kind in ID_KEYS}
        for kind, keys in ID_KEYS.items():
            if not 0 <= ids[kind] < n:
                ids[kind] = -1
            for key in keys:
                if K + key in meta and 0 <= int(meta[K + key]) < n:
                    ids[kind] = int(meta[K + key])
        self.add_bos = bool(meta.get(K + "add_bos_token", self.add_bos))
        self.add_eos = bool(meta.get(K + "add_eos_token", self.add_eos))
        self.eog_ids = frozenset(special_ids(self.texts, self.token_to_id, self.attrs, ids))
        self._ids = ids

        special = [i for i, a in enumerate(self.attrs) if a & SPECIAL]
        self._pieces: list[bytes | None] = [None] * n  # token_to_piece(special=True), built on demand
        strip_attrs(meta, self.token_to_id, self.attrs, special)
        self._specials = SpecialSplitter(
            [self.texts[i] for i in special], special, [self.attrs[i] for i in special]
        )
        self._cache: dict[str, list[int]] = {}
        if model == "llama":
            self._spm_boundary = _spm_boundary(self.texts)

    @classmethod
    def from_metadata(cls, meta: dict) -> Tokenizer:
        """meta: GGUF keys -> values, as `pyquant.gguf.GGUFFile(path).metadata` gives them."""
        return cls(meta)

    # ---------------------------------------------------------------- ids

    n_vocab = property(lambda self: len(self.texts))
    bos_id = property(lambda self: self._id("bos"))
    eos_id = property(lambda self: self._id("eos"))
    eot_id = property(lambda self: self._id("eot"))
    eom_id = property(lambda self: self._id("eom"))
    unk_id = property(lambda self: self._id("unk"))
    pad_id = property(lambda self: self._id("pad"))

    def _id(self, kind: str) -> int | None:
        return None if self._ids[kind] == -1 else self._ids[kind]

    def is_eog(self, token: int) -> bool:
        return token in self.eog_ids

    # ---------------------------------------------------------------- encode

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> ids, as llama_tokenize(text, add_special, parse_special).

        add_special: BOS/EOS as the model asks (`tokenizer.ggml.add_bos_token`, `add_eos_token`).
        parse_special: control tokens written in the text (`<|im_start|>`) become their ids; user-defined
        tokens always do."""
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._required("bos"))
        prev_special = True
        for piece in self._specials.split(text, parse_special):
            if isinstance(piece, int):
                out.append(piece)
                prev_special = True
            elif self.model == "llama":
                out += self._encode_spm(piece, self.add_space_prefix and prev_special)
                prev_special = False
            else:
                for word in self._splitter.split(piece):
                    out += self._cached(word, self._encode_bpe_word)
        if add_special and self.add_eos:
            out.append(self._required("eos"))
        return out

    def _required(self, kind: str) -> int:
        if self._ids[kind] == -1:
            raise PyquantError(f"the vocabulary asks for a {kind.upper()} token but defines none")
        return self._ids[kind]

    def _cached(self, key: str, compute) -> list[int]:
        ids = self._cache.get(key)
        if ids is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            ids = self._cache[key] = compute(key)
        return ids

    def _encode_bpe_word(self, word: str) -> list[int]:
        spelled = byte_encode(word)
        if self.ignore_merges and spelled in self.token_to_id:
            return [self.token_to_id[spelled]]
        ranks = self._ranks
        out = []
        for part in merge(list(spelled), lambda a, b: ranks.get((a, b))):
            tid = self.token_to_id.get(part)
            if tid is not None:
                out.append(tid)
            else:  # a merge result the vocabulary lacks: its single-byte (ASCII) characters, the rest dropped
                out += [self.token_to_id[c] for c in part if len(c.encode()) == 1 and c in self.token_to_id]
        return out

    def _encode_spm(self, text: str, space_prefix: bool) -> list[int]:
        text = (" " + text if space_prefix else text).replace(" ", "▁")
        out = []
        for run in self._spm_boundary.split(text) if self._spm_boundary else [text]:
            out += self._cached(run, self._encode_spm_run)
        return out

    def _encode_spm_run(self, text: str) -> list[int]:
        token_to_id, scores = self.token_to_id, self.scores

        def priority(a: str, b: str) -> float | None:
            tid = token_to_id.get(a + b)
            return None if tid is None else -scores[tid]

        out = []
        for part in merge(list(text), priority):
            tid = token_to_id.get(part)
            if tid is not None:
                out.append(tid)
                continue
            for byte in part.encode():  # byte fallback: <0xXX>, else the byte as a one-character token
                tid = token_to_id.get(f"<0x{byte:02X}>", token_to_id.get(chr(byte)))
                if tid is None:
                    raise PyquantError(
                        f"the vocabulary has no token for byte 0x{byte:02X} (no <0x{byte:02X}>)"
                    )
                out.append(tid)
        return out

    # ---------------------------------------------------------------- decode

    def token_to_piece(self, token: int, special: bool = True, lstrip: int = 0) -> bytes:
        """The bytes one token stands for (llama_token_to_piece). special=False renders control tokens as
        nothing; lstrip drops up to that many leading spaces."""
        if not 0 <= token < len(self.texts):
            raise PyquantError(f"token id {token} is outside the vocabulary (0..{len(self.texts) - 1})")
        if not special and self.attrs[token] & (Attr.UNKNOWN | Attr.CONTROL):
            return b""
        piece = self._pieces[token]
        if piece is None:
            piece = self._pieces[token] = self._piece(token)
        while lstrip > 0 and piece[:1] == _ASCII_SPACE:
            piece, lstrip = piece[1:], lstrip - 1
        return piece

    def _piece(self, token: int) -> bytes:
        attr, text = self.attrs[token], self.texts[token]
        if attr & (Attr.UNKNOWN | Attr.CONTROL | Attr.USER_DEFINED):
            return text.encode()
        if attr & Attr.NORMAL:
            return text.replace("▁", " ").encode() if self.model == "llama" else _decode_bytes(text)
        if attr & Attr.BYTE:
            return bytes([_hex_byte(text[3:5])])
        return b""

    def decode_bytes(self, ids: Iterable[int], special: bool = True, remove_special: bool = False) -> bytes:
        """Ids -> bytes, as llama_detokenize(ids, remove_special, unparse_special=special).

        special: render control tokens (`<|im_end|>`) as their text. remove_special: drop the BOS/EOS that
        encode(add_special=True) added."""
        ids = list(ids)
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self._ids["bos"]:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self._ids["eos"]:
            ids = ids[:-1]
        out = b"".join(
            self.token_to_piece(t, special, int(remove_space and i == 0)) for i, t in enumerate(ids)
        )
        return _clean_spaces(out) if self.clean_spaces else out

    def decode(self, ids: Iterable[int], special: bool = True, remove_special: bool = False) -> str:
        """Ids -> text (decode_bytes, then UTF-8 with U+FFFD for any incomplete or invalid sequence)."""
        return self.decode_bytes(ids, special, remove_special).decode("utf-8", errors="replace")


def _strings(values) -> list[str]:
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in values]


def _numbers(meta: dict, key: str, n: int, dtype, default) -> list:
    if key not in meta:
        return [default] * n
    values = np.asarray(meta[key], dtype=dtype)
    if values.ndim != 1 or len(values) < n:
        raise PyquantError(f"{key} has {values.size} entries for {n} tokens")
    return values[:n].tolist()


def _merge_ranks(meta: dict) -> dict[tuple[str, str], int]:
    if K + "merges" not in meta:
        raise PyquantError("tokenizer.ggml.merges is missing (a gpt2 vocabulary needs its merges)")
    ranks: dict[tuple[str, str], int] = {}
    for rank, line in enumerate(_strings(meta[K + "merges"])):
        cut = line.find(" ", 1)
        pair = (line[:cut], line[cut + 1 :]) if cut != -1 else ("", "")
        ranks.setdefault(pair, rank)  # the first line of a repeated merge counts
    return ranks


def _spm_boundary(texts: list[str]) -> re.Pattern | None:
    """Where SPM text can be cut into runs tokenized separately: before a "▁" that follows a character c no
    token has in front of a "▁". No token then spans the cut, so no merge crosses it and the runs merge
    independently, exactly as the whole text would."""
    before = {
        t[k - 1] for t in texts if "▁" in t[1:] for k in range(1, len(t)) if t[k] == "▁" and t[k - 1] != "▁"
    }
    return re.compile(f"(?<=[^▁{re.escape(''.join(sorted(before)))}])(?=▁)")


def _decode_bytes(text: str) -> bytes:
    """A byte-level token's text -> its bytes (llama_decode_text, with its marker for foreign characters)."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError:
        out = bytearray()
        for c in text:
            if c in CHAR_TO_BYTE:
                out.append(CHAR_TO_BYTE[c])
            else:
                out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
        return bytes(out)


def _hex_byte(digits: str) -> int:
    """strtol(digits, 16) as llama.cpp's token_to_byte reads `<0xXX>`: the longest hex prefix, else 0."""
    m = re.match(r"[0-9a-fA-F]+", digits)
    return int(m.group(), 16) & 0xFF if m else 0


def _clean_spaces(text: bytes) -> bytes:
    """llama_detokenize's clean_up_tokenization_spaces passes: " ," -> ",", " ' " -> "'", " 's" -> "'s"."""
    text = re.sub(rb" (?=[?!.,])", b"", text)
    text = re.sub(rb" ' ", b"'", text)
    return re.sub(rb" (?='(?:[sm]|re|ve))", b"", text)
