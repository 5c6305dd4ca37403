"""Generation: the decode loop (streaming, stop on end-of-generation tokens and stop strings, timings) and
the `pyquant run` subcommand.

`pyquant run` prints only generated text on stdout; its last stderr line is the stats line
`prompt: N tokens, X tok/s | generate: M tokens, Y tok/s | ttft: Z s` (prompt rate is prefill time alone,
generate rate is decode time alone, ttft is from the start of prefill to the first sampled token).
The line before it reports the start-up: model load, and the time to first token from the command's launch,
labelled a cold start when kernels had to be compiled (first run after installing or editing them) and a
warm start when every kernel came from the disk cache.
"""

from __future__ import annotations

import codecs
import sys
import time
from dataclasses import dataclass

import numpy as np

from .sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    n_prompt: int = 0
    n_generated: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    n_decode_steps: int = 0
    ttft_s: float = 0.0
    stop_reason: str = "length"

    def line(self) -> str:
        pp = self.n_prompt / self.prefill_s if self.prefill_s else 0.0
        tg = self.n_decode_steps / self.decode_s if self.decode_s else 0.0
        return (f"prompt: {self.n_prompt} tokens, {pp:.1f} tok/s | generate: {self.n_generated} tokens, "
                f"{tg:.1f} tok/s | ttft: {self.ttft_s:.2f} s")


class TextStream:
    """Turns token ids into text as they come, holding back split UTF-8 sequences and any tail that could
    still become a stop string."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.text += self.decoder.decode(self.tokenizer.token_to_piece(token))
        return self._release(final=False)

    def flush(self) -> str:
        self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.stopped = True
                self.text = self.text[:at]
                break
        end = len(self.text)
        if not final and not self.stopped:
            # hold back a suffix that is a prefix of some stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out


GREEDY_CHUNK = 16  # greedy tokens chosen on the device per host round trip (0: one forward a token)


def generate_tokens(model, prompt_ids: list[int], max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                    top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                    cache=None, pos0: int = 0, stats: GenerationStats | None = None, stop_on_eog: bool = True):
    """Yield sampled token ids. With `cache`/`pos0`, the prompt continues an existing context (chat turns);
    the cache then holds every token but the last yielded one (it is fed at the next call's start).

    Greedy sampling (temperature 0, no repeat penalty) takes the tokens after the first GREEDY_CHUNK at a time
    from `Transformer.greedy` (on the CUDA backend: chosen on the device, one host round trip a chunk). It
    yields the same tokens and stops at the same point as one forward a token; a chunk's steps past the stop
    only write cache positions after the last token fed, which nothing reads before they are written again.
    Stats count as the per-token loop does (n_decode_steps: tokens fed back; decode_s: a chunk's time spread
    evenly over its tokens, counted as each is taken), so a chat session's cache bookkeeping stays right."""
    sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed))
    stats = stats if stats is not None else GenerationStats()
    cache = cache if cache is not None else model.new_cache()
    ids = np.asarray(prompt_ids, dtype=np.int64)
    model._check_tokens(ids)
    stats.n_prompt = len(ids)
    if pos0 + len(ids) + max_tokens > cache.n_ctx:
        max_tokens = max(0, cache.n_ctx - pos0 - len(ids))
    if len(ids) == 0:
        return
    history = list(prompt_ids)
    eog = model.tokenizer.eog_ids
    chunked = sampler.greedy and GREEDY_CHUNK > 0 and hasattr(model.transformer, "greedy")
    ahead: list[int] = []  # greedy tokens chosen and not yet taken
    t0 = time.perf_counter()
    logits = model.transformer.forward(ids, pos0, cache)
    stats.prefill_s = time.perf_counter() - t0
    pos = pos0 + len(ids)
    for i in range(max_tokens):
        if i == 0:
            tok = sampler(logits, history)
            stats.ttft_s = time.perf_counter() - t0
        else:  # the step that feeds the last token yielded
            t1 = time.perf_counter()
            if chunked:
                if not ahead:
                    n = min(GREEDY_CHUNK, max_tokens - i)
                    ahead = model.transformer.greedy(tok, pos, cache, n).tolist()
                    per_token = (time.perf_counter() - t1) / len(ahead)
                tok = ahead.pop(0)
                stats.decode_s += per_token
            else:
                logits = model.transformer.forward(np.array([tok], dtype=np.int64), pos, cache)
                tok = sampler(logits, history)
                stats.decode_s += time.perf_counter() - t1
            stats.n_decode_steps += 1
            pos += 1
        if stop_on_eog and tok in eog:
            stats.stop_reason = "stop"
            return
        stats.n_generated += 1
        history.append(tok)
        yield tok


def add_model_arguments(p, sampling: bool = True) -> None:
    """The options every model-running subcommand shares (run, chat, perplexity)."""
    p.add_argument("-m", "--model", help="GGUF file (default: the Qwen2.5-Coder-0.5B-Instruct test model)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--backend", "--device", dest="backend", choices=["numpy", "cpu", "cuda"], default=None)
    p.add_argument("--cache-type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"], help="KV cache type")
    if sampling:
        p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 is greedy")
        p.add_argument("--top-k", type=int, default=40)
        p.add_argument("--top-p", type=float, default=0.95)
        p.add_argument("--min-p", type=float, default=0.05)
        p.add_argument("--repeat-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)


def sampling_options(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed)


def load_model(args):
    from .model import Model

    return Model(args.model, n_ctx=args.ctx_size, threads=args.threads, backend=args.backend,
                 cache_type=args.cache_type)


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", required=True, help="prompt text (special-token strings are parsed)")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def startup_line(load_s: float, first_token_s: float | None, counts: tuple[int, int] | None) -> str:
    ttft = f"{first_token_s:.2f} s" if first_token_s is not None else "n/a (no token)"
    if counts is None:
        kind = "no kernels to compile"
    elif counts[1]:
        kind = f"cold start: {counts[1]} kernels compiled, {counts[0]} from cache"
    else:
        kind = f"warm start: {counts[0]} kernels from cache"
    return f"load: {load_s:.2f} s | first token after launch: {ttft} ({kind})"


def run(args) -> int:
    from .cli import LAUNCHED

    t_load = time.perf_counter()
    model = load_model(args)
    load_s = time.perf_counter() - t_load
    stats = GenerationStats()
    stream = TextStream(model.tokenizer, args.stop)
    prompt_ids = model.tokenize(args.prompt)
    first_token_s = None
    for tok in generate_tokens(model, prompt_ids, max_tokens=args.n_predict, stats=stats, **sampling_options(args)):
        if first_token_s is None:
            first_token_s = time.perf_counter() - LAUNCHED
            counts = model.backend.compile_counts()  # decode kernels come later; prefill's decide the label
        sys.stdout.write(stream.push(tok))
        sys.stdout.flush()
        if stream.stopped:
            stats.stop_reason = "stop"
            break
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    if first_token_s is None:
        counts = model.backend.compile_counts()
    print(f"{startup_line(load_s, first_token_s, counts)} | backend {model.backend.name}", file=sys.stderr)
    print(stats.line(), file=sys.stderr)
    return 0

