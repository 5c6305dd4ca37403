"""Tokenizers from GGUF metadata alone, identical to llama.cpp's: byte-level BPE ("gpt2") and
SentencePiece-style ("llama"). See core.py for the pipeline.

    tok = Tokenizer.from_metadata(GGUFFile(path).metadata)
    ids = tok.encode("<|im_start|>user\\nhi<|im_end|>")
    text = tok.decode(ids)
"""

from .core import Tokenizer
from .pretokenize import PRE_TOKENIZERS
from .specials import Attr
from .stream import StreamDecoder

__all__ = ["PRE_TOKENIZERS", "Attr", "StreamDecoder", "Tokenizer"]
