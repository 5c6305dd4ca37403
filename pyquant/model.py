"""The transformer, written once for every architecture (llama, qwen2, gemma3), and the `Model` API.

Weights keep their GGUF names; which optional tensors exist (biases, QK-norms, post-norms, output) is read
from the file, the rest from the architecture row in arch.py. Every op goes through the backend.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .arch import HParams, read_hparams
from .backend import make_backend
from .errors import GGUFError, PyquantError
from .gguf import GGUFFile


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: object
    wk: object
    wv: object
    wo: object
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    attn_post_norm: np.ndarray | None
    ffn_norm: np.ndarray
    w_gate: object
    w_up: object
    w_down: object
    ffn_post_norm: np.ndarray | None


class Transformer:
    """Weights and the forward pass over a backend."""

    def __init__(self, f: GGUFFile, backend):
        # --- PTQ hook: files from `pyquant quantize` whose linears are composites (pyquant/ptq/runtime.py)
        from .ptq.runtime import composite_weights

        ptq = composite_weights(f)  # None for plain GGUF
        self.kv_quant = ptq.kv_quant if ptq else None
        # ---
        self.hp: HParams = read_hparams(ptq.file if ptq else f)
        self.backend = backend
        hp = self.hp

        def vec(name, required=True):
            if name not in f.tensors:
                if required:
                    raise GGUFError(f"{f.path}: missing tensor {name!r} ({hp.arch})")
                return None
            t = f.tensors[name]
            if t.type != "f32":
                return backend.from_host(np.asarray(_plain_f32(t)))
            return backend.from_host(t.array())

        def mat(name):
            if ptq and name in ptq:  # PTQ hook
                return ptq[name]
            return backend.weight(f.tensor(name))

        self.tok_embd = f.tensor("token_embd.weight")
        if self.tok_embd.shape != (hp.n_vocab, hp.n_embd):
            raise GGUFError(f"{f.path}: token_embd.weight has shape {self.tok_embd.shape}, "
                            f"expected ({hp.n_vocab}, {hp.n_embd})")
        self.embd = backend.weight(self.tok_embd)
        # tied embeddings: no output.weight means the output projection reuses token_embd
        self.output = mat("output.weight") if "output.weight" in f.tensors else self.embd
        self.output_norm = vec("output_norm.weight")
        self.layers = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            self.layers.append(Layer(
                attn_norm=vec(p + "attn_norm.weight"),
                wq=mat(p + "attn_q.weight"), wk=mat(p + "attn_k.weight"), wv=mat(p + "attn_v.weight"),
                wo=mat(p + "attn_output.weight"),
                bq=vec(p + "attn_q.bias", False), bk=vec(p + "attn_k.bias", False), bv=vec(p + "attn_v.bias", False),
                q_norm=vec(p + "attn_q_norm.weight", False), k_norm=vec(p + "attn_k_norm.weight", False),
                attn_post_norm=vec(p + "post_attention_norm.weight", hp.flags.post_norms),
                ffn_norm=vec(p + "ffn_norm.weight"),
                w_gate=mat(p + "ffn_gate.weight"), w_up=mat(p + "ffn_up.weight"), w_down=mat(p + "ffn_down.weight"),
                ffn_post_norm=vec(p + "post_ffw_norm.weight", hp.flags.post_norms),
            ))

    def new_cache(self, n_ctx: int):
        hp = self.hp
        maker = self.kv_quant or self.backend  # PTQ hook: a quantized KV cache (Atom)
        return maker.new_cache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v)

    def forward(self, tokens: np.ndarray, pos0: int, cache, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions pos0.. through the model, filling the cache. Returns float32 logits on the
        host: (T, n_vocab) if all_logits else (n_vocab,) for the last token."""
        be = self.backend
        t = len(tokens)
        if pos0 + t > cache.n_ctx:
            raise PyquantError(f"context full: {pos0 + t} tokens exceed n_ctx {cache.n_ctx}")
        replay = getattr(be, "replay_step", None)  # a decode step the backend recorded can run without this code
        if replay is not None and t == 1:
            build = lambda: self._forward(tokens, pos0, cache, all_logits)
            return replay((self, cache, all_logits), tokens, pos0, build)
        return self._forward(tokens, pos0, cache, all_logits)

    def greedy(self, tok: int, pos: int, cache, n: int) -> np.ndarray:
        """The next n greedy tokens (np.argmax of the logits, int32) after feeding `tok` at `pos`: tok and the
        first n - 1 chosen go into the cache at pos .. pos + n - 1, as n forward calls would put them. A
        backend with `replay_greedy` chooses them on the device once a decode step is recorded (the first
        call may run a forward step to record one); otherwise forward steps and np.argmax."""
        if n <= 0:
            return np.zeros(0, np.int32)
        if pos + n > cache.n_ctx:
            raise PyquantError(f"context full: {pos + n} tokens exceed n_ctx {cache.n_ctx}")
        if not 0 <= tok < self.hp.n_vocab:
            raise PyquantError(f"token id out of range [0, {self.hp.n_vocab})")
        run = getattr(self.backend, "replay_greedy", None)
        out: list[int] = []
        while len(out) < n:
            got = run((self, cache, False), tok, pos, n - len(out)) if run is not None else None
            if got is not None:  # the key is forward's: the step the forward call below recorded
                return np.concatenate([np.asarray(out, np.int32), got])
            tok = int(np.argmax(self.forward(np.array([tok], dtype=np.int64), pos, cache)))
            out.append(tok)
            pos += 1
        return np.asarray(out, np.int32)

    def _forward(self, tokens: np.ndarray, pos0: int, cache, all_logits: bool) -> np.ndarray:
        hp, be = self.hp, self.backend
        t = len(tokens)
        positions = np.arange(pos0, pos0 + t, dtype=np.int64)
        x = be.get_rows(self.embd, np.asarray(tokens, dtype=np.int64))  # (T, D)
        if hp.flags.embed_scale:
            x = be.scale(x, math.sqrt(hp.n_embd))
        for il, L in enumerate(self.layers):
            base, freq_scale = hp.layer_rope(il)
            # --- attention
            h = be.rms_norm(x, L.attn_norm, hp.eps)
            q = be.linear(h, L.wq, L.bq).reshape(t, hp.n_head, hp.head_dim_k)  # (T, H, Dh)
            k = be.linear(h, L.wk, L.bk).reshape(t, hp.n_head_kv, hp.head_dim_k)  # (T, G, Dh)
            v = be.linear(h, L.wv, L.bv).reshape(t, hp.n_head_kv, hp.head_dim_v)  # (T, G, Dv)
            if L.q_norm is not None:
                q = be.rms_norm(q, L.q_norm, hp.eps)
                k = be.rms_norm(k, L.k_norm, hp.eps)
            q = be.rope(q, positions, hp.n_rot, base, hp.flags.rope_neox, freq_scale)
            k = be.rope(k, positions, hp.n_rot, base, hp.flags.rope_neox, freq_scale)
            a = be.attention(q, k, v, cache, il, pos0, hp.attn_scale, hp.layer_window(il))  # (T, H*Dv)
            a = be.linear(a, L.wo)
            if L.attn_post_norm is not None:
                a = be.rms_norm(a, L.attn_post_norm, hp.eps)
            x = be.add(x, a)
            # --- feed-forward
            h = be.rms_norm(x, L.ffn_norm, hp.eps)
            gate, up = be.linear(h, L.w_gate), be.linear(h, L.w_up)
            h = be.swiglu(gate, up) if hp.flags.activation == "swiglu" else be.geglu(gate, up)
            h = be.linear(h, L.w_down)
            if L.ffn_post_norm is not None:
                h = be.rms_norm(h, L.ffn_post_norm, hp.eps)
            x = be.add(x, h)
        if not all_logits:
            x = x[t - 1 : t]
        x = be.rms_norm(x, self.output_norm, hp.eps)
        logits = be.to_host(be.linear(x, self.output))
        return logits if all_logits else logits[0]


def _plain_f32(t) -> np.ndarray:
    from .quants import dequantize

    return dequantize(t.data, t.type, t.shape)


def default_backend() -> str:
    return os.environ.get("PYQUANT_BACKEND", "cpu")


class Model:
    """A GGUF model ready to run: `tokenize`, `detokenize`, `logits`, `generate`, `create_chat_completion`."""

    def __init__(self, path: str | os.PathLike | None = None, n_ctx: int = 4096, threads: int | None = None,
                 backend: str | None = None, cache_type: str = "f16"):
        from .models import model_path
        from .tokenizer import Tokenizer

        self.path = os.fspath(path) if path is not None else os.fspath(model_path("default"))
        self.file = GGUFFile(self.path)
        options = {"threads": threads}
        if cache_type != "f16":
            options["cache_type"] = cache_type
        self.backend = make_backend(backend or default_backend(), **options)
        self.transformer = Transformer(self.file, self.backend)
        self.hp = self.transformer.hp
        self.n_ctx = min(n_ctx, self.hp.n_ctx_train) if n_ctx else self.hp.n_ctx_train
        self.tokenizer = Tokenizer.from_metadata(self.file.metadata)
        self.chat_template = self.file.get("tokenizer.chat_template")

    @property
    def n_vocab(self) -> int:
        return self.hp.n_vocab

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=True)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def new_cache(self, n_ctx: int | None = None):
        return self.transformer.new_cache(n_ctx or self.n_ctx)

    def logits(self, tokens) -> np.ndarray:
        """float32 (len(tokens), n_vocab) for a fresh context."""
        tokens = np.asarray(list(tokens), dtype=np.int64)
        self._check_tokens(tokens)
        cache = self.new_cache(max(len(tokens), 1))
        return self.transformer.forward(tokens, 0, cache, all_logits=True)

    def _check_tokens(self, tokens: np.ndarray) -> None:
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.n_vocab):
            raise PyquantError(f"token id out of range [0, {self.n_vocab})")

    def generate(self, prompt, max_tokens: int = 128, **sampling):
        """Yield generated token ids (see pyquant.generate.generate_tokens for the options)."""
        from .generate import generate_tokens

        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        yield from generate_tokens(self, ids, max_tokens=max_tokens, **sampling)

    def create_chat_completion(self, messages, max_tokens: int = 256, temperature: float = 0.2, **kw) -> dict:
        from .chat import create_chat_completion

        return create_chat_completion(self, messages, max_tokens=max_tokens, temperature=temperature, **kw)
