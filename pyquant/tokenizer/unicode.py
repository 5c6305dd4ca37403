"""Codepoint classes as llama.cpp sees them (src/unicode.cpp), the collapsed text its regexes run on, and
GPT-2's byte-level alphabet.

Python's `re` has no \\p{L}. llama.cpp has the same problem with std::regex and solves it by running each
pre-tokenizer regex on a *collapsed* copy of the text (unicode_regex_split): ASCII stays as it is, every other
codepoint becomes one stand-in character for its class (whitespace -> \\x0b, number -> \\xd1, letter -> \\xd2,
punctuation -> \\xd3, mark -> \\xd4, symbol -> \\xd5, anything else -> \\xd0), and `\\p{L}` in the regex becomes
`[\\xd2A-Za-z]`. We do exactly that: one `str.translate`, then a plain ASCII regex. The collapsed text has one
character per codepoint, so match offsets index the original text too.

The classes come from llama.cpp's own table (_unicode_ranges.py, generated from its unicode-data.cpp), not
from `unicodedata`, whose Unicode version depends on the Python build; the two differ on ~5,000 codepoints
assigned after Unicode 14.
"""

from __future__ import annotations

import bisect
import re

from ._unicode_ranges import RANGES, WHITESPACE

_starts: list[int] = []
_categories: list[str] = []
for _start, _cat in re.findall(r"([0-9a-f]+)([A-Z])", "".join(RANGES)):
    _starts.append(int(_start, 16))
    _categories.append(_cat)
WHITESPACE_CPTS = frozenset(int(w, 16) for w in WHITESPACE.split())

# the stand-in characters of unicode_regex_split's collapsed text, and the ASCII members of each class
COLLAPSED_WHITESPACE = "\x0b"
COLLAPSED = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
COLLAPSED_OTHER = "\xd0"
ASCII_MEMBERS = {
    "N": "0-9",
    "L": "A-Za-z",
    "P": r"!-#%-*,-/:-;?-@\[-\]_\{\}",
    "M": "",
    "S": r"\$\+<->\^`\|~",
}


def category(cpt: int) -> str:
    """llama.cpp's category of a codepoint: one of U(ndefined) N L Z M P S C."""
    return _categories[bisect.bisect_right(_starts, cpt) - 1] if cpt < _starts[-1] else "U"


def is_whitespace(cpt: int) -> bool:
    return cpt in WHITESPACE_CPTS


class _CollapseTable(dict):
    """str.translate table: codepoint -> collapsed character, filled on first sight of each codepoint."""

    def __missing__(self, cpt: int) -> str:
        if cpt < 128:
            char = chr(cpt)
        elif cpt in WHITESPACE_CPTS:
            char = COLLAPSED_WHITESPACE
        else:
            char = COLLAPSED.get(category(cpt), COLLAPSED_OTHER)
        self[cpt] = char
        return char


_COLLAPSE = _CollapseTable()


def collapse(text: str) -> str:
    """The text as llama.cpp's regexes see it: same length, non-ASCII codepoints replaced by their class."""
    return text if text.isascii() else text.translate(_COLLAPSE)


# GPT-2 byte-level BPE: every byte is one printable character (unicode_byte_to_utf8_map)
def _byte_alphabet() -> list[str]:
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {char: b for b, char in enumerate(BYTE_TO_CHAR)}
_BYTE_ENCODE = {b: char for b, char in enumerate(BYTE_TO_CHAR)}  # latin-1 codepoint (= byte) -> its char


def byte_encode(text: str) -> str:
    """The text's UTF-8 bytes, one byte-level character each (what GPT-2 vocabularies are spelled in)."""
    return text.encode("utf-8").decode("latin-1").translate(_BYTE_ENCODE)
