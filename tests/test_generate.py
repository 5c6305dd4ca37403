"""Sampling, streaming text, stop strings, chat templates and sessions, and the run/chat/perplexity CLIs.

References: float64 numpy re-implementations of each sampling filter; transformers' apply_chat_template for
the chat template; a fresh-context run for the KV cache a chat session keeps between turns."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import pyquant
from pyquant.chat import ChatSession, render_chat
from pyquant.errors import PyquantError
from pyquant.generate import TextStream
from pyquant.sampling import Sampler, SamplingParams

BACKEND = "numpy"
STARTUP_LINE = re.compile(
    r"^load: [\d.]+ s \| first token after launch: [\d.]+ s \((cold|warm) start: .*\) \| backend \w+$"
)
STATS_LINE = re.compile(r"^prompt: \d+ tokens, [\d.]+ tok/s \| generate: \d+ tokens, [\d.]+ tok/s \| ttft: [\d.]+ s$")


@pytest.fixture(scope="module")
def qwen(qwen_path):
    return pyquant.Model(qwen_path, n_ctx=512, backend=BACKEND)


def reference_candidates(logits, top_k, top_p, min_p):
    """The token ids a sampler may draw, computed independently in float64 with explicit loops."""
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    if top_k:
        order = order[:top_k]
    z = np.array([logits[i] for i in order], dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    kept, total = [], 0.0
    for i, prob in zip(order, p):
        kept.append((i, prob))
        total += prob
        if total >= top_p:
            break
    return {i for i, prob in kept if prob >= min_p * kept[0][1]}


@pytest.mark.parametrize("top_k,top_p,min_p", [(40, 0.95, 0.05), (0, 0.5, 0.0), (5, 1.0, 0.2), (0, 1.0, 0.0)])
def test_sampler_draws_only_allowed_tokens(top_k, top_p, min_p):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(200) * 3).astype(np.float32)
    allowed = reference_candidates(logits.tolist(), top_k, top_p, min_p)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p, seed=1))
    drawn = {sampler(logits, []) for _ in range(400)}
    assert drawn <= allowed
    assert len(drawn) >= min(len(allowed), 3)


def test_sampler_greedy_seed_and_penalty():
    logits = np.array([1.0, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0))(logits, []) == 1
    # penalty divides positive logits of recent tokens: 3.0 / 1.5 = 2.0 < 2.9
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.5))(logits, [1]) == 2

    def draws(seed):
        sampler = Sampler(SamplingParams(seed=seed, top_k=0, top_p=1, min_p=0))
        return [sampler(logits, []) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    with pytest.raises(PyquantError, match="top_p"):
        Sampler(SamplingParams(top_p=0))


class ByteTokens:
    """A tokenizer whose tokens are single bytes: splits multi-byte UTF-8 across tokens."""

    def token_to_piece(self, token: int) -> bytes:
        return bytes([token])


def test_text_stream_utf8_and_stop_strings():
    text = "héllo 🙂 wörld STOP after"
    stream = TextStream(ByteTokens(), stop=["STOP"])
    out = "".join(stream.push(b) for b in text.encode())
    out += stream.flush()
    assert out == "héllo 🙂 wörld "
    assert stream.stopped
    # a held-back prefix of a stop string that never completes is released
    stream = TextStream(ByteTokens(), stop=["STOP"])
    out = "".join(stream.push(b) for b in "a STO".encode()) + stream.flush()
    assert out == "a STO"


def test_chat_template_matches_transformers(qwen):
    transformers = pytest.importorskip("transformers")
    from pathlib import Path

    path = Path(qwen.path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for messages in (
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3? ü 🙂"}],
    ):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(qwen.chat_template, messages) == expected


def test_chat_session_reuses_cache_and_matches_fresh_context(qwen):
    session = ChatSession(qwen)
    first, stats1 = session.send("Write one word: hello", max_tokens=6, temperature=0)
    second, stats2 = session.send("Now another word", max_tokens=6, temperature=0)
    ids = session.prompt_tokens(session.messages[:-1])
    assert stats2.n_prompt < len(ids) // 2, "the second turn re-prefilled the whole conversation"
    # the same second reply from a fresh context
    fresh = ChatSession(qwen)
    fresh.messages = list(session.messages[:-1])
    fresh_ids = fresh.prompt_tokens(fresh.messages)
    assert fresh_ids == ids
    fresh_tokens = list(fresh.reply(fresh_ids, max_tokens=6, temperature=0))
    assert qwen.detokenize(fresh_tokens).startswith(second) or second.startswith(qwen.detokenize(fresh_tokens))


def test_create_chat_completion_shape(qwen):
    out = qwen.create_chat_completion([{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0)
    assert out["object"] == "chat.completion"
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    chunks = list(qwen.create_chat_completion([{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0,
                                              stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == choice["message"]["content"]


def test_gemma_without_template_needs_one(gemma_path):
    m = pyquant.Model(gemma_path, n_ctx=256, backend=BACKEND)
    with pytest.raises(PyquantError, match="no chat template"):
        ChatSession(m)
    ids = ChatSession(m, "gemma").prompt_tokens([{"role": "user", "content": "hi"}])
    assert ids[0] == m.tokenizer.bos_id and ids.count(m.tokenizer.bos_id) == 1


def test_cli_run_stats_line_and_stdout(cli, qwen_path, qwen):
    r = cli("run", "-m", str(qwen_path), "-p", "def add(a, b):", "-n", "8", "--temp", "0", "--backend", BACKEND,
            timeout=300)
    assert r.returncode == 0, r.stderr
    assert STATS_LINE.match(r.stderr.strip().splitlines()[-1]), r.stderr
    expected = qwen.detokenize(list(qwen.generate("def add(a, b):", max_tokens=8, temperature=0)))
    assert r.stdout == expected + "\n"


def test_cli_run_second_start_loads_every_kernel_from_the_disk_cache(cli, qwen_path):
    """The start-up line above the stats line: the first run may compile; the next one must compile nothing."""
    lines = []
    for _ in range(2):
        r = cli("run", "-m", str(qwen_path), "-p", "Hello", "-n", "2", "--temp", "0", "--backend", "cpu", timeout=900)
        assert r.returncode == 0, r.stderr
        lines.append(r.stderr.strip().splitlines()[-2])
    assert STARTUP_LINE.match(lines[1]) and "warm start" in lines[1], lines


def test_cli_chat_piped_two_turns(cli, qwen_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pyquant.cli", "chat", "-m", str(qwen_path), "-n", "4", "--temp", "0",
                        "--backend", BACKEND], input="hello\nhow are you\n", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.stderr.splitlines() if line.startswith("prompt:")]
    assert len(stats) == 2 and all(STATS_LINE.match(s) for s in stats)
    assert len(r.stdout.splitlines()) == 2


def test_cli_perplexity_json(cli, qwen_path, tmp_path):
    from pathlib import Path

    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"
    out = tmp_path / "ppl.json"
    r = cli("perplexity", "-m", str(qwen_path), "-f", str(text), "--ctx", "64", "--chunks", "2", "--json", str(out),
            "--backend", BACKEND, timeout=300)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"PPL = (\d+\.\d{4}) \+/- (\d+\.\d{4})", last)
    assert m, last
    data = json.loads(out.read_text())
    assert abs(data["ppl"] - float(m.group(1))) < 1e-4 and data["n_chunks"] == 2 and data["n_scored"] == 2 * 31
    bad = cli("perplexity", "-m", str(qwen_path), "-f", str(tmp_path / "nope.txt"), timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("pyquant: error:") and len(bad.stderr.splitlines()) == 1
