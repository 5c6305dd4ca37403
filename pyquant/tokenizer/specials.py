"""Token attributes, special token ids, end-of-generation ids, and the split of text at special tokens.

All as llama_vocab::impl::load and tokenizer_st_partition do it (src/llama-vocab.cpp). GGUF token types become
attribute bits; a few token texts are promoted to CONTROL and to end-of-generation (llama.cpp decides EOG by
text: `<|im_end|>`, `<end_of_turn>`, ...); CONTROL, USER_DEFINED and UNKNOWN tokens are "special" and are cut
out of the text before tokenization, longest first (user-defined ones even when special parsing is off).
"""

from __future__ import annotations

import re
from enum import IntFlag

from ..errors import PyquantError


class Attr(IntFlag):
    """llama_token_attr."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# GGUF tokenizer.ggml.token_type -> attribute (llama_token_type: 0 undefined .. 6 byte)
TYPE_TO_ATTR = {0: 0, 1: int(Attr.NORMAL), 2: int(Attr.UNKNOWN), 3: int(Attr.CONTROL)}
TYPE_TO_ATTR |= {4: int(Attr.USER_DEFINED), 5: int(Attr.UNUSED), 6: int(Attr.BYTE)}
SPECIAL = Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN

# special ids found by text when the metadata has none, in llama.cpp's order of candidates
AUTO_IDS = {
    "eot": (
        "<|eot_id|> <|im_end|> <|end|> <end_of_turn> <|endoftext|> <|end_of_text|> <EOT> _<EOT> [EOT] "
        "<｜end▁of▁sentence｜> <end_of_utterance>"
    ),
    "eom": "<|eom_id|>",
    "fim_pre": "<|fim_prefix|> <fim-prefix> <fim_prefix> <｜fim▁begin｜> <PRE> ▁<PRE> <|code_prefix|> <|prefix|>",
    "fim_suf": "<|fim_suffix|> <fim-suffix> <fim_suffix> <｜fim▁hole｜> <SUF> ▁<SUF> <|code_suffix|> <|suffix|>",
    "fim_mid": "<|fim_middle|> <fim-middle> <fim_middle> <｜fim▁end｜> <MID> ▁<MID> <|code_middle|> <|middle|>",
    "fim_pad": "<|fim_pad|> <fim-pad> <fim_pad> <PAD> [PAD]",
    "fim_rep": "<|fim_repo|> <|repo_name|> <fim-repo> <REPO> <reponame>",
    "fim_sep": "<|file_sep|>",
}
EOG_TEXTS = frozenset(
    (
        *("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>"),
        *("<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]"),
        *("<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>"),
        *("<｜end▁of▁sentence｜>", "[e~["),
    )
)
ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss: set USER_DEFINED


def special_ids(
    texts: list[str], token_to_id: dict[str, int], attrs: list[int], ids: dict[str, int]
) -> set[int]:
    """Complete `ids` (bos, eos, ... from defaults and metadata; -1 for none) with the ids llama.cpp finds by
    text, adjust `attrs` as it does, and return the end-of-generation ids.

    llama.cpp takes the first candidate in its hash map's order where several texts qualify (Qwen has both
    <|im_end|> and <|endoftext|>); we take them in its list's order, which agrees on the models we test."""
    for kind, candidates in AUTO_IDS.items():
        if ids.get(kind, -1) != -1:
            continue
        for text in candidates.split():
            if text in token_to_id:
                ids[kind] = tid = token_to_id[text]
                attrs[tid] |= Attr.CONTROL
                break
    for text, tid in token_to_id.items():
        if attrs[tid] & Attr.CONTROL and "unused" in text:
            attrs[tid] |= Attr.UNUSED
    eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids.get(k, -1) != -1}
    for text in EOG_TEXTS:
        if (tid := token_to_id.get(text)) is not None:
            eog.add(tid)
            attrs[tid] |= Attr.CONTROL
    for text in ALWAYS_RENDERED:
        if (tid := token_to_id.get(text)) is not None:
            attrs[tid] = Attr.USER_DEFINED
    eog |= {ids[k] for k in ("eos", "eot", "eom") if ids.get(k, -1) != -1}
    by_text = {texts[tid]: tid for tid in eog if 0 <= tid < len(texts)}
    # o200k_harmony / solar-open: "<|end|>" is not the end of generation there
    has_call = "<|call|>" in by_text or "<|calls|>" in by_text
    if "<|end|>" in by_text and has_call and ("<|return|>" in by_text or "<|flush|>" in by_text):
        eog.discard(by_text["<|end|>"])
        attrs[by_text["<|end|>"]] = Attr.USER_DEFINED
    # gemma4 and plamo have a normal </s>
    if "</s>" in by_text and ("<|tool_response>" in by_text or "<|plamo:eos|>" in by_text):
        eog.discard(by_text["</s>"])
        attrs[by_text["</s>"]] = Attr.NORMAL
    return eog


def strip_attrs(meta: dict, token_to_id: dict[str, int], attrs: list[int], special: list[int]) -> None:
    """Per-model LSTRIP/RSTRIP attributes, chosen by model name as llama.cpp does (there are none in GGUF)."""
    name = str(meta.get("general.name", "")).lower()
    pre = str(meta.get("tokenizer.ggml.pre", ""))
    arch = str(meta.get("general.architecture", ""))

    def set_attr(text: str, attr: Attr, on: bool, required: bool = False) -> None:
        if text in token_to_id:
            tid = token_to_id[text]
            attrs[tid] = attrs[tid] | attr if on else attrs[tid] & ~attr
        elif required:  # llama.cpp fails to load such a vocabulary
            raise PyquantError(f"model {name!r} is treated as Phi-3, but its vocabulary lacks {text!r}")

    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or arch in (
        "nomic-bert-moe",
        "jina-bert-v3",
    ):
        set_attr("<mask>", Attr.LSTRIP, True)
    elif "phi-3" in name or "phi3" in name:
        for tid in special:
            attrs[tid] |= Attr.RSTRIP
        set_attr("</s>", Attr.RSTRIP, True, required=True)
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            set_attr(text, Attr.RSTRIP, False, required=True)
    elif "modern-bert" in name:
        set_attr("[MASK]", Attr.LSTRIP, True)


class SpecialSplitter:
    """Cuts special tokens out of text, as tokenizer_st_partition: for each special token, longest first
    (in UTF-8 bytes; ties by id, where llama.cpp's unstable sort leaves them unordered), every occurrence in
    every piece of text not yet cut becomes that token."""

    def __init__(self, texts: list[str], ids: list[int], attrs: list[int]):
        order = sorted(range(len(ids)), key=lambda k: (-len(texts[k].encode()), ids[k]))
        self.texts = [texts[k] for k in order]
        self.ids = [ids[k] for k in order]
        self.attrs = [attrs[k] for k in order]
        self.rank = {text: r for r, text in enumerate(self.texts)}
        self._finders: dict[bool, re.Pattern | None] = {}

    def _finder(self, parse_special: bool) -> re.Pattern | None:
        """A regex that finds, at each position, the longest special token starting there (a trie, so that
        thousands of tokens cost one pass)."""
        if parse_special not in self._finders:
            texts = [
                t
                for t, a in zip(self.texts, self.attrs)
                if parse_special or not a & (Attr.CONTROL | Attr.UNKNOWN)
            ]
            self._finders[parse_special] = re.compile(f"(?=({_trie_regex(texts)}))") if texts else None
        return self._finders[parse_special]

    def present(self, text: str, parse_special: bool) -> list[int]:
        """Ranks of the special tokens that occur in text: the longest at each position, and their prefixes."""
        finder = self._finder(parse_special)
        if finder is None:
            return []
        longest = {m.group(1) for m in finder.finditer(text)}
        found = {self.rank[t] for t in longest}
        for t in longest:
            found.update(self.rank[t[:k]] for k in range(1, len(t)) if t[:k] in self.rank)
        if not parse_special:
            found = {r for r in found if not self.attrs[r] & (Attr.CONTROL | Attr.UNKNOWN)}
        return sorted(found)

    def split(self, text: str, parse_special: bool) -> list[str | int]:
        """Text -> pieces: str for text still to tokenize, int for a special token's id."""
        pieces: list[tuple[int, int] | int] = [(0, len(text))] if text else []
        for r in self.present(text, parse_special):
            token, tid, attr = self.texts[r], self.ids[r], self.attrs[r]
            out = []
            for piece in pieces:
                if isinstance(piece, int):
                    out.append(piece)
                    continue
                start, end = piece
                while (at := text.find(token, start, end)) >= 0:
                    left = at
                    if attr & Attr.LSTRIP:
                        while left > start and text[left - 1] in " \t\n\v\f\r":
                            left -= 1
                    if left > start:
                        out.append((start, left))
                    out.append(tid)
                    start = at + len(token)
                    if attr & Attr.RSTRIP:
                        while start < end and text[start] in " \t\n\v\f\r":
                            start += 1
                if start < end:
                    out.append((start, end))
            pieces = out
        return [p if isinstance(p, int) else text[p[0] : p[1]] for p in pieces]


def _trie_regex(words: list[str]) -> str:
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = None

    def emit(node: dict) -> str:
        alts = [re.escape(ch) + emit(child) for ch, child in sorted(node.items(), key=lambda kv: kv[0]) if ch]
        if "" in node:
            alts.append("")  # a token ends here: tried last, so longer tokens win
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return emit(trie)
