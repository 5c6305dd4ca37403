"""`pyquant eval MODEL.gguf... --ref F16.gguf`: one quality and speed table over quantized files, and
`evaluate()`, the same as a library call.

Per model: bits per weight (all tensor bytes over the reference's weight count, and over the blocks' 2-D
weights alone), file size, WikiText-2 test perplexity with llama-perplexity's method (pyquant.perplexity:
ctx 512, the first --chunks chunks, second half of each scored), the KL divergence and top-1 agreement of
its next-token distributions against the reference model's on those same positions, and prefill / decode
speed. Everything runs on pyquant (--backend, default the Numba CPU backend, which runs plain GGUF and the
composite pyquant files alike; numpy is the slow reference); --llama-cpp also scores the files llama.cpp
loads with llama.cpp (same chunks, same code) and times them there.

The reference's log-probabilities are computed once and cached (float16, ~80 MB per chunk for a 152k
vocabulary) under ~/.cache/pyquant/eval, keyed by the reference file, text and settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import PyquantError
from .perplexity import perplexity

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "test.txt"


@dataclass
class Row:
    name: str
    path: str
    runtime: str
    bpw: float
    bpw_blocks: float
    size_mib: float
    ppl: float
    ppl_err: float
    kld: float
    top1: float
    prefill_tps: float
    decode_tps: float
    llama_ppl: float | None = None
    llama_prefill_tps: float | None = None
    llama_decode_tps: float | None = None


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def weight_counts(path) -> tuple[int, int]:
    """(all weights, 2-D block weights) of a plain GGUF model (the reference)."""
    from .gguf import GGUFFile

    f = GGUFFile(path)
    total = sum(t.n_elements for t in f.tensors.values())
    blocks = sum(t.n_elements for n, t in f.tensors.items() if n.startswith("blk.") and len(t.shape) == 2)
    return total, blocks


def file_bytes(path) -> tuple[int, int]:
    """(all tensor bytes, bytes of block tensors other than norms and biases)."""
    from .gguf import GGUFFile

    f = GGUFFile(path)
    total = sum(t.nbytes for t in f.tensors.values())
    blocks = sum(
        t.nbytes
        for n, t in f.tensors.items()
        if n.startswith("blk.") and not n.endswith(("norm.weight", ".bias"))
    )
    return total, blocks


class Reference:
    """The reference model's log-probabilities on the scored positions, computed once and cached."""

    def __init__(self, path, tokens, n_ctx, n_chunks, bos, backend, cache_dir: Path):
        key = hashlib.sha256(
            json.dumps(
                [
                    os.path.abspath(path),
                    os.path.getsize(path),
                    len(tokens),
                    tokens[:64],
                    n_ctx,
                    n_chunks,
                    bos,
                    backend,
                ]
            ).encode()
        ).hexdigest()[:16]
        self.file = cache_dir / f"ref-{key}.npy"
        self.meta = cache_dir / f"ref-{key}.json"
        self.path, self.n_ctx, self.n_chunks, self.first = path, n_ctx, n_chunks, n_ctx // 2
        self.tokens, self.bos, self.backend = tokens, bos, backend
        self.lp = None

    def ensure(self, progress=None):
        if self.file.exists() and self.meta.exists():
            self.lp = np.load(self.file, mmap_mode="r")
            return json.loads(self.meta.read_text())
        from .model import Model

        model = Model(self.path, n_ctx=self.n_ctx, backend=self.backend)
        vocab = model.n_vocab
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp.npy")
        lp = np.lib.format.open_memmap(
            tmp, "w+", np.float16, (self.n_chunks, self.n_ctx - 1 - self.first, vocab)
        )
        i = [0]

        def fn(chunk):
            logits = model.logits(chunk)
            lp[i[0]] = log_softmax(logits[self.first : self.n_ctx - 1]).astype(np.float16)
            i[0] += 1
            return logits

        res = perplexity(fn, self.tokens, self.n_ctx, self.n_chunks, self.bos, progress=progress)
        lp.flush()
        os.replace(tmp, self.file)
        meta = {"ppl": res.ppl, "ppl_err": res.ppl_err, "seconds": res.seconds}
        self.meta.write_text(json.dumps(meta))
        self.lp = np.load(self.file, mmap_mode="r")
        return meta


def score(logits_fn, ref: Reference, progress=None):
    """(PerplexityResult, mean KL(ref || model), top-1 agreement) of a runtime's logits function."""
    kls, agree, i = [], [], [0]

    def fn(chunk):
        logits = logits_fn(chunk)
        p = ref.lp[i[0]].astype(np.float64)
        q = log_softmax(logits[ref.first : ref.n_ctx - 1])
        kls.append((np.exp(p) * (p - q)).sum(axis=1))
        agree.append(p.argmax(axis=1) == q.argmax(axis=1))
        i[0] += 1
        return logits

    res = perplexity(fn, ref.tokens, ref.n_ctx, ref.n_chunks, ref.bos, progress=progress)
    return res, float(np.concatenate(kls).mean()), float(np.concatenate(agree).mean())


def decode_speed(step, n_prompt: int = 32, n_gen: int = 16) -> float:
    """Tokens per second of `step(token, pos)` calls after a prompt of n_prompt tokens; the first step is not
    timed (it compiles a single-token path that the prompt did not use: seconds against milliseconds)."""
    step(99, n_prompt)
    t0 = time.perf_counter()
    for j in range(n_gen):
        step(100 + j, n_prompt + 1 + j)
    return n_gen / (time.perf_counter() - t0)


def pyquant_decode(model, n_prompt=32, n_gen=16) -> float:
    cache = model.new_cache(n_prompt + 1 + n_gen)
    model.transformer.forward(np.arange(100, 100 + n_prompt), 0, cache)
    return decode_speed(lambda t, pos: model.transformer.forward(np.array([t]), pos, cache), n_prompt, n_gen)


def llama_cpp_loads(path) -> bool:
    """Whether llama.cpp can load the file: pyquant composite files name an architecture it does not know."""
    from .gguf import GGUFFile

    return "pyquant.linear.format" not in GGUFFile(path).metadata


def llama_runtime(path, n_ctx, threads):
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=threads
    )

    def logits(chunk):
        llm.reset()
        llm.eval(list(chunk))
        return np.array(llm.scores[: len(chunk)], dtype=np.float32)

    def decode(n_prompt=32, n_gen=16):
        llm.reset()
        llm.eval(list(range(100, 100 + n_prompt)))
        return decode_speed(lambda t, pos: llm.eval([t]), n_prompt, n_gen)

    return llm, logits, decode


def evaluate(
    models: list,
    ref_path,
    text_path=DEFAULT_TEXT,
    n_ctx: int = 512,
    n_chunks: int = 8,
    backend: str = "cpu",
    llama_cpp: bool = False,
    threads: int = 2,
    names=None,
    progress=None,
    log=None,
) -> tuple[dict, list[Row]]:
    """Score each GGUF in `models` against `ref_path`. Returns (reference summary, rows)."""
    from .model import Model

    log = log or (lambda s: None)
    text = Path(text_path).read_text(encoding="utf-8")
    ref_model = Model(ref_path, n_ctx=n_ctx, backend=backend)
    tok = ref_model.tokenizer
    tokens = tok.encode(text, add_special=True, parse_special=False)
    bos = tok.bos_id if tok.add_bos else None
    del ref_model
    cache = Path(os.environ.get("PYQUANT_CACHE", Path.home() / ".cache" / "pyquant")) / "eval"
    ref = Reference(ref_path, tokens, n_ctx, n_chunks, bos, backend, cache)
    log(f"reference {ref_path}: {len(tokens)} tokens, {n_chunks} chunks of {n_ctx}")
    ref_meta = ref.ensure(progress)
    n_all, n_blk = weight_counts(ref_path)
    rows = []
    for i, path in enumerate(models):
        name = names[i] if names else Path(path).stem
        log(f"{name}: pyquant ({backend})")
        model = Model(path, n_ctx=n_ctx, backend=backend, threads=threads)
        t_ppl = time.perf_counter()
        res, kld, top1 = score(model.logits, ref, progress)
        prefill = res.n_chunks * n_ctx / (time.perf_counter() - t_ppl)
        decode = pyquant_decode(model)
        del model
        b_all, b_blk = file_bytes(path)
        row = Row(
            name,
            str(path),
            f"pyquant-{backend}",
            8 * b_all / n_all,
            8 * b_blk / n_blk,
            os.path.getsize(path) / 2**20,
            res.ppl,
            res.ppl_err,
            kld,
            top1,
            prefill,
            decode,
        )
        if llama_cpp and llama_cpp_loads(path):
            log(f"{name}: llama.cpp")
            llm, fn, dec = llama_runtime(path, n_ctx, threads)
            t0 = time.perf_counter()
            lres = perplexity(fn, tokens, n_ctx, n_chunks, bos, progress=progress)
            row.llama_ppl = lres.ppl
            row.llama_prefill_tps = lres.n_chunks * n_ctx / (time.perf_counter() - t0)
            row.llama_decode_tps = dec()
            del llm
        rows.append(row)
        log(format_row(row))
    return {
        "path": str(ref_path),
        "ppl": ref_meta["ppl"],
        "ppl_err": ref_meta["ppl_err"],
        "n_ctx": n_ctx,
        "n_chunks": n_chunks,
        "text": str(text_path),
    }, rows


# ---- output ----------------------------------------------------------------------------------------------

HEADER = (
    "| method | bpw | bpw (blocks) | MiB | PPL | dPPL | KLD | top-1 | prefill t/s | decode t/s "
    "| llama.cpp PPL | llama.cpp pre/dec t/s |"
)


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def format_row(r: Row, ref_ppl: float | None = None) -> str:
    d = f"{100 * (r.ppl / ref_ppl - 1):+.2f}%" if ref_ppl else "-"
    speed = "-" if r.llama_prefill_tps is None else f"{r.llama_prefill_tps:.0f} / {r.llama_decode_tps:.1f}"
    return (
        f"| {r.name} | {r.bpw:.2f} | {r.bpw_blocks:.2f} | {r.size_mib:.0f} | {r.ppl:.3f} | {d} | {r.kld:.4f} "
        f"| {100 * r.top1:.1f}% | {r.prefill_tps:.1f} | {r.decode_tps:.2f} | {_f(r.llama_ppl, '.3f')} | {speed} |"
    )


def table(ref: dict, rows: list[Row]) -> str:
    lines = [
        (
            f"Reference {Path(ref['path']).name}: PPL {ref['ppl']:.3f} +/- {ref['ppl_err']:.3f} "
            f"(WikiText-2 test, {ref['n_chunks']} chunks x {ref['n_ctx']})"
        ),
        "",
        HEADER,
        "|" + "---|" * (HEADER.count("|") - 1),
    ]
    lines += [format_row(r, ref["ppl"]) for r in rows]
    return "\n".join(lines)


def plot(ref: dict, rows: list[Row], out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        a.scatter(r.bpw_blocks, r.ppl)
        a.annotate(r.name, (r.bpw_blocks, r.ppl), fontsize=8, xytext=(4, 2), textcoords="offset points")
    a.axhline(ref["ppl"], color="gray", ls="--", lw=1, label=f"reference {ref['ppl']:.2f}")
    a.set_xlabel("bits per weight (decoder blocks)")
    a.set_ylabel("WikiText-2 perplexity")
    ppls = [r.ppl for r in rows if math.isfinite(r.ppl)] + [ref["ppl"]]
    if max(ppls) > 3 * min(ppls):  # a broken row would flatten the rest
        a.set_yscale("log")
    a.legend()
    names = [r.name for r in rows]
    b.barh(names, [max(r.kld, 1e-6) for r in rows])
    b.set_xscale("log")
    b.set_xlabel("KL divergence vs reference (nats/token)")
    b.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("models", nargs="+", help="GGUF files to score")
    p.add_argument("--ref", required=True, help="unquantized reference GGUF (F16/F32) for KL divergence")
    p.add_argument("-f", "--file", default=str(DEFAULT_TEXT), help="text (default: WikiText-2 test.txt)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8, help="chunks scored (default 8)")
    p.add_argument("--backend", choices=["numpy", "cpu", "cuda"], default="cpu")
    p.add_argument("--llama-cpp", action="store_true", help="also score/time the files llama.cpp loads")
    p.add_argument("-t", "--threads", type=int, default=2, help="threads of pyquant and llama.cpp (2)")
    p.add_argument("--names", help="comma-separated row names (default: file stems)")
    p.add_argument("--json", metavar="OUT", help="write the table as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="PPL vs bits per weight and KLD, as a PNG")


def run(args) -> int:
    from .perplexity import progress_bar

    names = args.names.split(",") if args.names else None
    if names and len(names) != len(args.models):
        raise PyquantError(f"--names has {len(names)} names for {len(args.models)} models")
    for m in [args.ref, *args.models]:
        if not Path(m).is_file():
            raise PyquantError(f"{m}: no such file")
    ref, rows = evaluate(
        args.models,
        args.ref,
        args.file,
        args.ctx,
        args.chunks,
        args.backend,
        args.llama_cpp,
        args.threads,
        names,
        progress=progress_bar,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(table(ref, rows))
    if args.json:
        from .gguf import atomic_output

        with atomic_output(args.json) as tmp:
            data = {"reference": ref, "rows": [asdict(r) for r in rows]}
            tmp.write_text(json.dumps(data, indent=1))
    if args.plot:
        plot(ref, rows, args.plot)
    return 0 if all(math.isfinite(r.ppl) for r in rows) else 1
