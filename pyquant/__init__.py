"""pyquant: a portable LLM runtime and quantization toolkit (GGUF, ggml block formats, Numba kernels)."""

from .errors import GGUFError, PyquantError

__all__ = ["GGUFError", "PyquantError", "quantize", "dequantize", "Model"]


def __getattr__(name):
    # Lazy: `import pyquant` stays fast and the CLI loads only what a subcommand needs.
    if name in ("quantize", "dequantize"):
        from . import quants

        return getattr(quants, name)
    if name == "Model":
        from .model import Model

        return Model
    raise AttributeError(f"module 'pyquant' has no attribute {name!r}")
