"""Incremental detokenization for streaming generation: one token in, the text it completes out.

A token's piece may end inside a UTF-8 character (byte-fallback tokens, byte-level BPE pieces of CJK or emoji);
the incomplete bytes wait for the next token instead of coming out as U+FFFD. Fed a whole sequence, the output
is decode(ids) exactly for vocabularies without clean_spaces (Qwen2, SentencePiece ones); for the others it is
what llama.cpp's streaming prints (token_to_piece per token, no clean-up passes).
"""

from __future__ import annotations

import codecs

from .core import Tokenizer


class StreamDecoder:
    """`for t in generated: print(dec.feed(t), end="")`, then `print(dec.flush())`."""

    def __init__(self, tokenizer: Tokenizer, special: bool = True):
        self.tokenizer = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True

    def feed(self, token: int) -> str:
        lstrip = int(self._first and self.tokenizer.add_space_prefix)
        self._first = False
        return self._utf8.decode(self.tokenizer.token_to_piece(token, self.special, lstrip))

    def flush(self) -> str:
        """Whatever is still pending (an incomplete character comes out as U+FFFD); the decoder is then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._first = True
        return text
