"""Pre-tokenizers of byte-level BPE vocabularies, chosen by `tokenizer.ggml.pre`, as llama.cpp splits text.

Each pre-tokenizer is llama.cpp's list of regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), copied verbatim;
each regex splits every piece the previous one left, and text between matches stays a piece of its own
(unicode_regex_split_stl). A regex is turned into a Python one the way llama.cpp turns it into a std::regex:
`\\p{X}` becomes the class's collapsed stand-in plus its ASCII members (see unicode.py), and it runs on the
collapsed text. llama.cpp runs its three commonest regexes (gpt2, llama3, qwen2) through hand-written
splitters (unicode_regex_split_custom_*) that implement the same regex over the same character classes, so
the regex itself is the reference for those too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PyquantError
from .unicode import ASCII_MEMBERS, COLLAPSED, collapse

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")
STARCODER = (r"\p{N}", GPT2)
FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]")


@dataclass(frozen=True)
class PreTokenizer:
    """A row of llama.cpp's pre-tokenizer table: its regexes and the vocabulary flags set along with them."""

    regexes: tuple[str, ...]
    clean_spaces: bool = True  # detokenize() tidies " ," " 's" etc. (clean_up_tokenization_spaces)
    ignore_merges: bool = False  # a word that is a whole token is taken as is, before any merge
    add_bos: bool = False  # default for tokenizer.ggml.add_bos_token


def _rows(names: str, row: PreTokenizer) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names.split(), row)


# tokenizer.ggml.pre -> row, as llama_vocab::impl::load sets them (the subset pyquant supports)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer(DEFAULT),
    **_rows(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        PreTokenizer((LLAMA3,), ignore_merges=True, add_bos=True),
    ),
    **_rows("dbrx smaug-bpe", PreTokenizer((LLAMA3,))),
    **_rows(
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert exaone4 mpt olmo jais",
        PreTokenizer((GPT2,)),
    ),
    **_rows("trillion granite-docling", PreTokenizer((GPT2,), clean_spaces=False)),
    **_rows("starcoder refact codeshell exaone minerva-7b", PreTokenizer(STARCODER)),
    **_rows("command-r smollm", PreTokenizer(STARCODER, clean_spaces=False)),
    **_rows(
        "qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open", PreTokenizer((QWEN2,), clean_spaces=False)
    ),
    **_rows("megrez stablelm2", PreTokenizer((QWEN2,))),
    "falcon": PreTokenizer(FALCON),
}


def pre_tokenizer(name: str) -> PreTokenizer:
    if name not in PRE_TOKENIZERS:
        raise PyquantError(
            f"tokenizer.ggml.pre {name!r} is not a pre-tokenizer pyquant knows; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return PRE_TOKENIZERS[name]


_CATEGORY = re.compile(r"\\p\{(L[ultmo]?|N|P|M|S)\}")


def _to_python(expr: str) -> re.Pattern:
    """llama.cpp's regex -> a Python regex over the collapsed text (unicode_regex_split's rewrite)."""
    out, inside, i = [], False, 0
    while i < len(expr):
        ch = expr[i]
        if ch == "[" and (i == 0 or expr[i - 1] != "\\"):
            inside = True
        elif inside and ch == "]" and expr[i - 1] != "\\":
            inside = False
        elif m := _CATEGORY.match(expr, i):
            cls = m.group(1)[0]
            members = re.escape(COLLAPSED[cls]) + ASCII_MEMBERS[cls]
            out.append(members if inside else f"[{members}]")
            i = m.end()
            continue
        out.append(ch)
        i += 1
    # std::regex's \s and \S are the C locale's (ASCII) classes; non-ASCII whitespace is collapsed to \x0b
    return re.compile("".join(out), re.ASCII)


class Splitter:
    """Splits text into the words BPE runs on, with one pre-tokenizer's regexes."""

    def __init__(self, regexes: tuple[str, ...]):
        self.patterns = [_to_python(expr) for expr in regexes]

    def split(self, text: str) -> list[str]:
        collapsed = collapse(text)
        spans = [(0, len(text))]
        for pattern in self.patterns:
            pieces = []
            for start, end in spans:
                at = start
                for m in pattern.finditer(collapsed, start, end):
                    s, e = m.span()
                    if s > at:
                        pieces.append((at, s))
                    pieces.append((s, e))
                    at = e
                if at < end:
                    pieces.append((at, end))
            spans = pieces
        return [text[s:e] for s, e in spans if e > s]
