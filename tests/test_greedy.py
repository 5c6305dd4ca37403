"""Greedy decoding without a host round trip a token: the device argmax (kernels_cuda/argmax.py) against
np.argmax; CudaBackend.replay_greedy through Transformer.greedy and generate_tokens on the tiny model against
the numpy backend's forward + np.argmax loop; generate_tokens' chunked greedy path against one forward a token.

The CUDA tests run in numba's simulator without a GPU, on a one-head tiny model (a decode step takes seconds
there: they run six single-token passes in all).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from test_kernels_cuda import tiny_gguf

from pyquant import generate
from pyquant.backend import NumpyBackend
from pyquant.errors import PyquantError
from pyquant.gguf import GGUFFile
from pyquant.model import Transformer

# the simulator's one-head qwen2 tiny model's greedy continuations, no token repeated early (a token fed twice in
# a row would hide a step that read a stale one): [3, 17] -> 41, 8, 45, 13, 45, 45, 33, ...; [16] -> 38, 32, 5, ...
PROMPT = [3, 17]
START = 16


class TinyModel:
    """What generate_tokens needs of pyquant.model.Model (the tiny vocabulary has no merges: no tokenizer)."""

    def __init__(self, transformer, n_ctx: int, eog=()):
        self.transformer, self.n_ctx = transformer, n_ctx
        self.tokenizer = SimpleNamespace(eog_ids=set(eog))

    def new_cache(self):
        return self.transformer.new_cache(self.n_ctx)

    def _check_tokens(self, ids):
        pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return GGUFFile(tiny_gguf(tmp_path_factory.mktemp("greedy") / "tiny.gguf", "qwen2", n_head=1))


def reference(f, prompt, n):
    """The numpy backend's per-token loop: n greedy tokens after the prompt, and the logits of each step."""
    ref = Transformer(f, NumpyBackend(cache_type="f32", act_quant=False))
    cache = ref.new_cache(16)
    logits = [ref.forward(np.array(prompt), 0, cache)]
    toks = []
    for pos in range(len(prompt), len(prompt) + n):
        toks.append(int(np.argmax(logits[-1])))
        logits.append(ref.forward(np.array([toks[-1]]), pos, cache))
    return toks, logits


# ---- the argmax kernel -----------------------------------------------------------------------------------


def _vector(kind: str, n: int, rng) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "ties":  # the maximum in several blocks: the first wins
        x = rng.integers(0, 3, n).astype(np.float32)
    elif kind == "last":
        x[-1] = 10.0
    elif kind == "nan":  # np.argmax: the first NaN wins over every number
        x[[n // 2, n - 3]] = np.nan
        x[1] = np.inf
    elif kind == "-inf":
        x[:] = -np.inf
    elif kind == "zeros":  # -0.0 == 0.0: a tie
        x[:] = 0.0
        x[:5] = -0.0
    return x


@pytest.mark.cuda
def test_argmax_step_matches_numpy():
    """Sizes below one block of threads and off every multiple of it, one to BLOCKS blocks; each launch
    writes the token into params slot 1, moves the position on, appends to the ring (which it never
    overruns: the count goes on past its capacity)."""
    from kernels_cuda import argmax as am
    from kernels_cuda.launch import upload

    rng = np.random.default_rng(0)
    cases = [(48, "normal"), (1000, "ties"), (am.BLOCKS * am.THREADS + 37, "last"), (777, "nan"),
             (301, "-inf"), (130, "zeros")]
    scratch = am.scratch()
    params = upload(np.array([5, 0], np.int32))
    ring_all = upload(np.array([0] + [-1] * (len(cases) + 2), np.int32))  # a zero count, then sentinels
    ring = ring_all[: len(cases)]  # room for all but the last token
    want = []
    for n, kind in cases:
        x = _vector(kind, n, rng)
        want.append(int(np.argmax(x)))
        am.argmax_step[am.grid(n)](upload(x), n, params, ring, *scratch)
        assert params.copy_to_host()[1] == want[-1], (n, kind)
    assert am.grid(cases[2][0])[0] == am.BLOCKS and am.grid(48)[0] == 1
    assert params.copy_to_host()[0] == 5 + len(cases)
    got = ring_all.copy_to_host()
    assert got[0] == len(cases) and list(got[1 : len(cases)]) == want[:-1]
    assert list(got[len(cases) :]) == [-1] * 3  # past the ring: untouched
    assert scratch[2].copy_to_host()[0] == 0  # the count is left zeroed for the next launch


# ---- replay_greedy in the transformer ----------------------------------------------------------------------


@pytest.mark.cuda
def test_replay_greedy_matches_per_token_loop(tiny):
    """On the CUDA backend, against the numpy backend's forward + np.argmax loop from token START at position 0:
    Transformer.greedy (nothing recorded: replay_greedy says None, a forward step records the decode step, two
    steps run with the device argmax feeding each the token and position); an ordinary (replayed) step after
    them; then generate_tokens continuing the context at temperature 0 (its first token from the host's
    argmax, the next from replay_greedy). The tokens are the loop's; the last device step's logits, the
    parameter block and the cache are as the loop leaves them (the next steps' logits match it)."""
    from kernels_cuda.backend import CudaBackend

    want, want_logits = reference(tiny, [START], 6)  # want_logits[k]: after feeding want[k - 1] at position k
    be = CudaBackend(cache_type="f32", int8_decode=False)  # float products: the numpy loop's arithmetic
    m = Transformer(tiny, be)
    model = TinyModel(m, 8)
    cache = model.new_cache()
    assert be.replay_greedy((m, cache, False), START, 0, 2) is None  # no step recorded
    got = m.greedy(START, 0, cache, 3)
    assert got.dtype == np.int32 and list(got) == want[:3]
    assert be.n_greedy_steps == 2 and be.n_replays == 0
    s = be._step
    assert s.key[1] is cache and s.n_ctx == 8

    def close(a, b):
        return np.abs(a - b).max() < 1e-5 * np.abs(b).max()

    assert close(s.out.copy_to_host(), want_logits[2])  # the step at position 2, run by the device loop
    assert list(s.params.copy_to_host()) == [3, want[2]]  # next position, the token chosen last
    assert close(m.forward(np.array([want[2]]), 3, cache), want_logits[3])
    assert be.n_replays == 1
    stats = generate.GenerationStats()
    more = list(generate.generate_tokens(model, [want[3]], max_tokens=2, temperature=0, cache=cache, pos0=4,
                                         stats=stats))
    assert more == want[4:6] and (stats.n_generated, stats.n_decode_steps) == (2, 1)
    assert be.n_greedy_steps == 3 and be.n_replays == 2
    assert close(s.out.copy_to_host(), want_logits[5])
    with pytest.raises(PyquantError, match="out of range"):
        be.replay_greedy(s.key, m.hp.n_vocab, 6, 1)
    with pytest.raises(PyquantError, match="n_ctx"):
        be.replay_greedy(s.key, 1, 6, 3)
    with pytest.raises(PyquantError, match="context full"):
        m.greedy(1, 6, cache, 3)


# ---- generate_tokens' greedy chunks (numpy backend: Transformer.greedy's forward + np.argmax fallback) -------


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize(("stop", "max_tokens"), [(False, 10), (True, 10), (False, 1)])
def test_generate_greedy_chunks_match_per_token(tiny, monkeypatch, chunk, stop, max_tokens):
    """The same tokens, stop and stats with GREEDY_CHUNK tokens a call as with one forward a token (0), with
    an eog token (the first to come late: 33, 7th, in the simulator's model) inside a chunk or not; the cache
    then holds what the per-token loop left (a step fed next at the first position it does not count gives the
    same logits)."""
    tr = Transformer(tiny, NumpyBackend(cache_type="f32", act_quant=False))

    def run(n, eog=()):
        monkeypatch.setattr(generate, "GREEDY_CHUNK", n)
        model, stats = TinyModel(tr, 32, eog), generate.GenerationStats()
        cache = model.new_cache()
        toks = list(generate.generate_tokens(model, PROMPT, max_tokens=max_tokens, temperature=0, cache=cache,
                                             stats=stats))
        nxt = tr.forward(np.array([5]), len(PROMPT) + stats.n_decode_steps, cache)
        return toks, (stats.n_generated, stats.n_decode_steps, stats.stop_reason), nxt

    eog = ()
    if stop:
        seq = run(0)[0]
        late = [i for i, t in enumerate(seq) if i >= 4 and t not in seq[:i]]
        if not late:
            pytest.skip("no token comes first late in this model's continuation")
        eog = (seq[late[0]],)
    toks, stats, nxt = run(chunk, eog)
    want_toks, want_stats, want_nxt = run(0, eog)
    assert toks == want_toks and stats == want_stats
    assert np.array_equal(nxt, want_nxt)
    assert len(toks) == (late[0] if stop else max_tokens) and stats[2] == ("stop" if stop else "length")
