"""Chat: `tokenizer.chat_template` rendered with jinja2 the way transformers renders it, a session that keeps
the KV cache between turns (only the new suffix of the conversation is prefilled), `create_chat_completion`
shaped like llama-cpp-python's, and the interactive `pyquant chat` subcommand.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime

from .errors import PyquantError
from .generate import GenerationStats, TextStream, add_model_arguments, generate_tokens, load_model, sampling_options

# Used only when a file carries no template and the user names one (Gemma's base models have none).
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}


def _raise(message):
    raise PyquantError(f"chat template: {message}")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render as transformers' apply_chat_template does: sandboxed jinja2, trim_blocks and lstrip_blocks,
    loop controls, `raise_exception`, `tojson` without ASCII escaping, `strftime_now`."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
        x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **extra)
    except TemplateError as e:
        raise PyquantError(f"chat template: {e}") from None


class ChatSession:
    """A conversation with one model; the KV cache persists across turns, and each turn prefills only the
    tokens after the longest prefix the cache already holds."""

    def __init__(self, model, template: str | None = None, system: str | None = None, n_ctx: int | None = None):
        self.model = model
        self.template = template or model.chat_template
        if not self.template:
            raise PyquantError(f"{model.path} has no chat template; pass one (--chat-template "
                               f"{'|'.join(BUILTIN_TEMPLATES)} or a jinja file)")
        self.template = BUILTIN_TEMPLATES.get(self.template, self.template)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache = model.new_cache(n_ctx)
        self.cached: list[int] = []  # tokens whose K/V the cache holds, from position 0

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        tok = self.model.tokenizer
        bos = tok.texts[tok.bos_id] if tok.bos_id is not None else ""
        eos = tok.texts[tok.eos_id] if tok.eos_id is not None else ""
        text = render_chat(self.template, messages, bos_token=bos, eos_token=eos)
        # a template that writes BOS itself must not get a second one
        add_special = not (bos and text.startswith(bos))
        return self.model.tokenize(text, add_special=add_special)

    def reply(self, ids: list[int], stats: GenerationStats | None = None, **sampling):
        """Yield the reply's token ids to the prompt `ids`, reusing the cached prefix."""
        keep = 0
        while keep < min(len(self.cached), len(ids) - 1) and self.cached[keep] == ids[keep]:
            keep += 1
        stats = stats if stats is not None else GenerationStats()
        generated = []
        try:
            for tok in generate_tokens(self.model, ids[keep:], cache=self.cache, pos0=keep, stats=stats, **sampling):
                generated.append(tok)
                yield tok
        finally:
            # the cache holds the prompt and every generated token that was fed back
            self.cached = (ids + generated)[: len(ids) + stats.n_decode_steps]

    def send(self, content: str, stream=None, **sampling) -> tuple[str, GenerationStats]:
        self.messages.append({"role": "user", "content": content})
        ids = self.prompt_tokens(self.messages)
        stats = GenerationStats()
        text = TextStream(self.model.tokenizer, sampling.pop("stop", ()))
        for tok in self.reply(ids, stats=stats, **sampling):
            piece = text.push(tok)
            if stream and piece:
                stream(piece)
            if text.stopped:
                break
        tail = text.flush()
        if stream and tail:
            stream(tail)
        self.messages.append({"role": "assistant", "content": text.text})
        return text.text, stats


def create_chat_completion(model, messages: list[dict], max_tokens: int = 256, temperature: float = 0.2,
                           top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
                           seed: int | None = None, stop: list[str] | str | None = None, stream: bool = False):
    """One completion for `messages`, returned as llama-cpp-python returns it (or, with stream=True, an
    iterator of chat.completion.chunk dicts)."""
    session = ChatSession(model)
    ids = session.prompt_tokens(messages)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repeat_penalty=repeat_penalty, seed=seed)
    cid, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())
    stats = GenerationStats()
    text = TextStream(model.tokenizer, stops)

    def pieces():
        for tok in session.reply(ids, stats=stats, **sampling):
            yield text.push(tok)
            if text.stopped:
                stats.stop_reason = "stop"
                break
        yield text.flush()

    if stream:
        def chunks():
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model.path}
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
            for piece in pieces():
                if piece:
                    yield {**head, "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                                "finish_reason": None}]}
            yield {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": stats.stop_reason}]}
        return chunks()

    content = "".join(pieces())
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model.path,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                     "finish_reason": stats.stop_reason}],
        "usage": {"prompt_tokens": len(ids), "completion_tokens": stats.n_generated,
                  "total_tokens": len(ids) + stats.n_generated},
    }


def add_arguments(p):
    add_model_arguments(p)
    p.set_defaults(temp=0.7)
    p.add_argument("--system", help="system message")
    p.add_argument("--chat-template", help=f"jinja file, or {'/'.join(BUILTIN_TEMPLATES)}, when the file has none")
    p.add_argument("-n", "--n-predict", type=int, default=512, help="most tokens per reply")


def run(args) -> int:
    from pathlib import Path

    model = load_model(args)
    template = args.chat_template
    if template and template not in BUILTIN_TEMPLATES:
        try:
            template = Path(template).read_text(encoding="utf-8")
        except OSError as e:
            raise PyquantError(f"{args.chat_template}: cannot read chat template: {e.strerror}") from None
    session = ChatSession(model, template, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"pyquant chat: {Path(model.path).name} ({model.backend.name}); empty line or Ctrl-D ends",
              file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or (interactive and not line.strip()):
            return 0
        if not line.strip():
            continue

        def write(piece):
            sys.stdout.write(piece)
            sys.stdout.flush()

        _, stats = session.send(line.rstrip("\n"), stream=write, max_tokens=args.n_predict,
                                **sampling_options(args))
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(stats.line(), file=sys.stderr)
