"""GGUF container: a strict memory-mapped reader and an atomic writer over the gguf package's writer."""

from .reader import GGUFFile, TensorInfo
from .writer import atomic_output, write_gguf

__all__ = ["GGUFFile", "TensorInfo", "atomic_output", "write_gguf"]
