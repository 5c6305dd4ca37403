"""Perplexity with llama-perplexity's method, and the `pyquant perplexity` subcommand.

The whole text is tokenized once (BOS as the model says), cut into chunks of n_ctx tokens; each chunk is run
from a fresh context with its first token replaced by BOS (when the model adds one), and only its second half
is scored: logits at positions n_ctx/2 .. n_ctx-2 predict the next token. PPL = exp(mean NLL); the +/- is
llama.cpp's standard error of the mean NLL carried through exp.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import PyquantError


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (float64) of each target under each row of logits."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return lse - z[np.arange(len(targets)), targets]


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    n_chunks: int
    n_ctx: int
    n_scored: int
    seconds: float
    chunk_ppl: list[float] = field(default_factory=list)

    def line(self) -> str:
        return f"PPL = {self.ppl:.4f} +/- {self.ppl_err:.4f}"


def chunk_tokens(tokens: list[int], n_ctx: int, n_chunks: int | None) -> int:
    available = len(tokens) // n_ctx
    if available < 1 or len(tokens) < 2 * n_ctx:
        raise PyquantError(f"text has {len(tokens)} tokens; perplexity with --ctx {n_ctx} needs at least {2 * n_ctx}")
    return min(available, n_chunks) if n_chunks else available


def summarize(nll: np.ndarray) -> tuple[float, float]:
    mean = float(nll.mean())
    var = float((nll**2).mean() - mean * mean)
    err = math.sqrt(var / (len(nll) - 1)) if var > 0 and len(nll) > 1 else 0.0
    return math.exp(mean), math.exp(mean) * err


def perplexity(logits_fn, tokens: list[int], n_ctx: int, n_chunks: int | None, bos_id: int | None,
               progress=None) -> PerplexityResult:
    """`logits_fn(chunk_tokens) -> (n_ctx, n_vocab)` runs one chunk from a fresh context; any runtime
    (pyquant, llama.cpp) plugs in, so both are scored by exactly this code."""
    n = chunk_tokens(tokens, n_ctx, n_chunks)
    first = n_ctx // 2
    all_nll, chunk_ppl = [], []
    t0 = time.perf_counter()
    for i in range(n):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        logits = logits_fn(chunk)
        targets = np.asarray(tokens[i * n_ctx + first + 1 : (i + 1) * n_ctx])
        nll = log_softmax_nll(logits[first : n_ctx - 1], targets)
        all_nll.append(nll)
        chunk_ppl.append(math.exp(float(nll.mean())))
        if progress:
            progress(i + 1, n, summarize(np.concatenate(all_nll))[0], time.perf_counter() - t0)
    nll = np.concatenate(all_nll)
    ppl, err = summarize(nll)
    return PerplexityResult(ppl, err, n, n_ctx, len(nll), time.perf_counter() - t0, chunk_ppl)


def progress_bar(done: int, total: int, running_ppl: float, elapsed: float) -> None:
    width = 30
    filled = width * done // total
    eta = elapsed / done * (total - done)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} chunks  "
                     f"PPL {running_ppl:.4f}  {elapsed:.0f}s elapsed, ~{eta:.0f}s left")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def add_arguments(p):
    from .generate import add_model_arguments

    add_model_arguments(p, sampling=False)
    p.add_argument("-f", "--file", required=True, help="text file (e.g. ../shared/data/wikitext-2/test.txt)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all)")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON")


def run(args) -> int:
    from .generate import load_model

    try:
        text = open(args.file, encoding="utf-8").read()
    except OSError as e:
        raise PyquantError(f"{args.file}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PyquantError(f"{args.file}: not UTF-8 text") from None
    if args.ctx < 4:
        raise PyquantError(f"--ctx must be at least 4, got {args.ctx}")
    args.ctx_size = args.ctx
    model = load_model(args)
    tok = model.tokenizer
    tokens = tok.encode(text, add_special=True, parse_special=False)
    bos = tok.bos_id if tok.add_bos else None
    print(f"{args.file}: {len(tokens)} tokens, ctx {args.ctx}", file=sys.stderr)
    result = perplexity(model.logits, tokens, args.ctx, args.chunks, bos, progress=progress_bar)
    print(f"{result.n_chunks} chunks, {result.n_scored} tokens scored in {result.seconds:.1f} s "
          f"({result.n_chunks * args.ctx / result.seconds:.1f} tok/s)")
    if args.json:
        from .gguf import atomic_output

        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps({"model": model.path, "file": args.file, **asdict(result)}, indent=1))
    print(result.line())
    return 0
