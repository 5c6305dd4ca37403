"""`pyquant bench`: prompt processing and generation speed of pyquant's CPU and CUDA backends, each beside a
peer on the same GGUF file, as llama-bench measures them.

Each engine runs in its own child process on the same file and the same random token ids: pp (one forward of
an n_prompt-token prompt, tok/s), tg (greedy generation of n_gen tokens from an empty context, tok/s; see
below), medians over the repetitions; the first run of each side is a warm-up. The parent reads each child's
peak RSS from the kernel (os.wait4's rusage, the RUSAGE_CHILDREN accounting of that one child) and its time to
first token: from the child's start, imports and model load included, to the logits of an 8-token prompt (or
the pp prompt if shorter; with numba's cache warm: run the bench twice after a fresh install).

    pyquant bench [-m FILE] [--device cpu,cuda] [-t 1,2] [-p 512] [-n 128] [-r 3] [--json OUT] [--plot PNG]

Devices and their peers:
- cpu, once per thread count: pyquant's Numba CPU backend against llama.cpp, llama-cpp-python's
  `Llama(path, n_ctx, n_threads, n_batch=512)` timing `eval`, like llama-bench.
- cuda: pyquant's CUDA backend (it replays the decode step as a CUDA graph) against torch fp16: transformers
  loading the same GGUF (dequantized to fp16) on the GPU, pp one forward of the prompt, tg greedy steps
  over its KV cache from the same first token, the argmax read back each step.
  The decode roofline: the bytes of the matrices one decode step reads (every blk.* 2-D weight and the
  output projection, or token_embd when tied) x tg tok/s / the device bandwidth, measured in the same child
  as read + write bytes per second of a device-to-device copy.
pyquant's tg column is greedy generation as `pyquant run --temp 0` does it: `Transformer.greedy` in chunks
of pyquant.generate.GREEDY_CHUNK tokens. On CUDA each replayed decode step is followed by the device argmax,
which feeds the next step its token and position, so the host waits once a chunk (the chunk's tokens copied
back), not once a token; on the CPU backends it is forward + np.argmax a token.
A peer that cannot run (its package missing, no CUDA device for torch, an architecture transformers cannot
load from GGUF) gets a row that says why; the rest still runs.

JSON (--json): {"model", "file_bytes", "n_prompt", "n_gen", "reps", "backend", "cache_type", "devices",
"weight_bytes_per_token", "runs": [{"threads", "pyquant": SIDE, "llama.cpp": SIDE}] (cpu; [] without it),
"cuda": {"pyquant": SIDE + {"bandwidth_bytes_s", "bandwidth_by"}, "torch fp16": SIDE, "roofline"} (only with
cuda)}, where SIDE is {"pp", "tg" (tok/s medians), "pp_runs", "tg_runs", "ttft_s", "rss_bytes"} or
{"unavailable": "why"}, and roofline is the fraction of the measured bandwidth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

DEVICES = {"cpu": ("pyquant", "llama.cpp"), "cuda": ("pyquant", "torch fp16")}  # device -> (ours, peer)
SHORT_PROMPT = 8
RSS_ALLOWANCE = 300 * 2**20  # the target: peak RSS <= file size + KV cache + 300 MB


class Unavailable(Exception):
    """A side that cannot run here; its message is the row's one-line reason."""


# --- children ---------------------------------------------------------------------------------------------
def _tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    import numpy as np

    # ids 1000..20000 are ordinary text tokens in real vocabularies (no control tokens); tiny test models
    # have fewer ids than that and draw from all of them
    lo, hi = (1000, 20000) if n_vocab >= 20000 else (0, n_vocab)
    return np.random.default_rng(seed).integers(lo, hi, n).tolist()


def _short(spec: dict) -> int:
    """Tokens of the time-to-first-token prompt: 8, or the pp prompt when that is shorter (the CUDA
    simulator's tests run a 1-token prompt)."""
    return min(SHORT_PROMPT, spec["n_prompt"])


def _measure_pyquant(spec: dict, t_start: float) -> dict:
    import numpy as np

    from pyquant.backend import make_backend
    from pyquant.gguf import GGUFFile
    from pyquant.model import Transformer

    if spec["device"] == "cuda":
        from numba import cuda

        if not cuda.is_available():
            raise Unavailable("numba sees no CUDA device")
    n_ctx = spec["n_prompt"] + spec["n_gen"] + SHORT_PROMPT
    backend = make_backend(spec["backend"], threads=spec["threads"], cache_type=spec["cache_type"])
    model = Transformer(GGUFFile(spec["model"]), backend)
    cache = model.new_cache(n_ctx)
    v = spec["n_vocab"]
    model.forward(np.array(_tokens(_short(spec), v, 1)), 0, cache)
    ttft = time.perf_counter() - t_start
    prompt, gen = np.array(_tokens(spec["n_prompt"], v)), _tokens(spec["n_gen"], v, 2)

    def pp():
        t = time.perf_counter()
        model.forward(prompt, 0, cache)
        return time.perf_counter() - t

    def tg():  # greedy generation, as generate_tokens runs it (the first call records the decode step)
        from .generate import GREEDY_CHUNK

        tok, chunk = gen[0], max(GREEDY_CHUNK, 1)
        t = time.perf_counter()
        for i in range(0, spec["n_gen"], chunk):
            tok = int(model.greedy(tok, i, cache, min(chunk, spec["n_gen"] - i))[-1])
        return time.perf_counter() - t

    result = _repeat(spec, pp, tg) | {
        "ttft_s": ttft,
        "kv_bytes": cache.nbytes if hasattr(cache, "nbytes") else None,
    }
    if spec["device"] == "cuda":
        result["bandwidth_bytes_s"], result["bandwidth_by"] = device_bandwidth()
    return result


def _measure_llama(spec: dict, t_start: float) -> dict:
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise Unavailable("llama-cpp-python is not installed (pip install 'pyquant[bench]')") from None

    n_ctx = spec["n_prompt"] + spec["n_gen"] + SHORT_PROMPT
    try:  # llama.cpp refuses files pyquant reads (a vocabulary without merges, as in the tests' tiny models)
        llm = llama_cpp.Llama(
            spec["model"],
            n_ctx=n_ctx,
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            n_batch=512,
            verbose=False,
        )
    except ValueError as e:
        raise Unavailable(f"llama.cpp cannot load it: {e}") from None
    v = spec["n_vocab"]
    llm.eval(_tokens(_short(spec), v, 1))
    ttft = time.perf_counter() - t_start
    prompt, gen = _tokens(spec["n_prompt"], v), _tokens(spec["n_gen"], v, 2)

    def pp():
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        return time.perf_counter() - t

    def tg():
        llm.reset()
        t = time.perf_counter()
        for tok in gen:
            llm.eval([tok])
        return time.perf_counter() - t

    return _repeat(spec, pp, tg) | {"ttft_s": ttft}


def _measure_torch(spec: dict, t_start: float) -> dict:
    try:
        import torch
        from transformers import AutoModelForCausalLM, DynamicCache
        from transformers.utils import logging as hf_logging
    except ModuleNotFoundError as e:
        raise Unavailable(f"{e.name} is not installed (pip install 'pyquant[convert]')") from None
    if not torch.cuda.is_available():
        raise Unavailable(f"torch {torch.__version__} sees no CUDA device")
    folder, name = os.path.split(os.path.abspath(spec["model"]))
    hf_logging.disable_progress_bar()  # a bar on stderr between our log lines
    # newer versions rename past_key_values (to `cache`); the old name works in every version we meet
    warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
    try:  # recent transformers keep GGUF blocks packed where they have a kernel: the peer is dense fp16
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older versions always dequantize
        dense = {}
    try:  # it knows fewer architectures than pyquant
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float16, **dense)
    except Exception as e:
        raise Unavailable(f"transformers cannot load it: {type(e).__name__}: {e}") from None
    model = model.to("cuda").eval()
    v = spec["n_vocab"]
    with torch.no_grad():
        model(torch.tensor([_tokens(_short(spec), v, 1)], device="cuda"))
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t_start
        prompt = torch.tensor([_tokens(spec["n_prompt"], v)], device="cuda")
        first = _tokens(spec["n_gen"], v, 2)[0]

        def pp():  # the last position's logits alone, as pyquant and llama.cpp compute them
            t = time.perf_counter()
            model(prompt, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        def tg():
            cache, tok = DynamicCache(), first
            t = time.perf_counter()
            for _ in range(spec["n_gen"]):
                out = model(torch.tensor([[tok]], device="cuda"), past_key_values=cache, use_cache=True)
                tok = int(out.logits[0, -1].argmax())
            return time.perf_counter() - t

        return _repeat(spec, pp, tg) | {"ttft_s": ttft}


def device_bandwidth(n_bytes: int | None = None, reps: int = 10) -> tuple[float, str]:
    """(bytes read + written per second, "numba" or "torch") of a device-to-device copy on the current GPU."""
    import numpy as np

    try:
        from numba import cuda

        from kernels_cuda.jit import SIM
    except ImportError:
        cuda = None
    # a few hundred MB, far past any cache; the simulator's "device" is host memory: keep its copy small
    n = n_bytes or (16 if cuda is not None and SIM else 512) * 2**20
    if cuda is not None and cuda.is_available():
        src, dst, stream = cuda.device_array(n, np.uint8), cuda.device_array(n, np.uint8), cuda.stream()
        # on a stream the copies queue back to back, so numba's host-side cost per call is not timed
        copy, sync, by = lambda: dst.copy_to_device(src, stream=stream), stream.synchronize, "numba"
    else:
        import torch

        src = torch.empty(n, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy, sync, by = lambda: dst.copy_(src), torch.cuda.synchronize, "torch"
    copy()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        copy()
    sync()
    return 2 * n * reps / (time.perf_counter() - t), by


def weight_bytes_per_token(path: str | os.PathLike) -> int:
    """Bytes of the matrices one decode step reads: every layer matrix and the output projection (token_embd
    when the output is tied to it; otherwise the step reads one embedding row, not counted)."""
    from pyquant.gguf import GGUFFile

    f = GGUFFile(path)
    out = f.tensors.get("output.weight", f.tensors["token_embd.weight"])
    layers = sum(t.nbytes for n, t in f.tensors.items() if n.startswith("blk.") and len(t.shape) == 2)
    return layers + out.nbytes


def _repeat(spec: dict, pp, tg) -> dict:
    """Warm-up once, then alternate pp and tg runs; per-run tok/s and their medians."""
    import numpy as np

    pp(), tg()
    pp_s, tg_s = [], []
    for _ in range(spec["reps"]):
        pp_s.append(spec["n_prompt"] / pp())
        tg_s.append(spec["n_gen"] / tg())
    return {"pp": float(np.median(pp_s)), "tg": float(np.median(tg_s)), "pp_runs": pp_s, "tg_runs": tg_s}


MEASURE = {"pyquant": _measure_pyquant, "llama.cpp": _measure_llama, "torch fp16": _measure_torch}


def child_main(spec_json: str, out_path: str) -> None:
    t_start = time.perf_counter()
    spec = json.loads(spec_json)
    try:
        result = MEASURE[spec["side"]](spec, t_start)
    except Unavailable as e:
        result = {"unavailable": str(e).splitlines()[0][:300]}
    with open(out_path, "w") as f:
        json.dump(result, f)


def run_child(spec: dict) -> dict:
    """Run one side in a fresh interpreter; its result plus the peak RSS the kernel accounted to it. A peer
    that fails is a row that says so (its traceback is on stderr above); pyquant failing is an error."""
    from .errors import PyquantError

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        code = f"import sys; from pyquant.bench import child_main; child_main(sys.argv[1], {out!r})"
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            why = f"{spec['device']} {spec['side']} benchmark child failed (exit {proc.returncode})"
            if spec["side"] == "pyquant":
                raise PyquantError(why)
            return {"unavailable": why}
        with open(out) as f:
            result = json.load(f)
    if spec["side"] == "pyquant" and "unavailable" in result:
        raise PyquantError(f"--device {spec['device']}: {result['unavailable']}")
    if "unavailable" not in result:
        result["rss_bytes"] = usage.ru_maxrss * 1024
    return result


# --- the command -------------------------------------------------------------------------------------------
def add_arguments(p):
    p.add_argument("-m", "--model", help="GGUF file (default: the Qwen2.5-Coder-0.5B-Instruct test model)")
    p.add_argument(
        "--device",
        default="cpu",
        metavar="cpu,cuda",
        help="comma-separated: cpu (pyquant's Numba CPU backend vs llama.cpp, per thread count), cuda "
        "(pyquant's CUDA backend vs transformers torch fp16 on the same GGUF, plus the decode roofline: "
        "weight bytes per token x tg tok/s / measured device bandwidth); default cpu",
    )
    p.add_argument("-t", "--threads", default="1,2", help="comma-separated CPU thread counts (default 1,2)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens of the pp test")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens of the tg test")
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--backend", default="cpu", choices=["cpu", "numpy"], help="pyquant's backend on cpu")
    p.add_argument("--cache-type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"])
    p.add_argument("--no-llama", action="store_true", help="no peers: pyquant only")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON (fields: `pydoc pyquant.bench`)")
    p.add_argument("--plot", metavar="OUT.png", help="bar chart of tok/s (matplotlib)")


def bench(
    model: str,
    threads: list[int],
    n_prompt=512,
    n_gen=128,
    reps=3,
    backend="cpu",
    cache_type="f16",
    llama=True,
    log=None,
    devices=("cpu",),
) -> dict:
    """Library form of the command: the JSON described in the module docstring. `llama=False`: no peers."""
    from .errors import PyquantError
    from .gguf import GGUFFile

    common = {"model": model, "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps, "cache_type": cache_type}
    embd = GGUFFile(model).tensors.get("token_embd.weight")
    if embd is None:
        raise PyquantError(f"{model}: no token_embd.weight tensor: not a language model")
    n_vocab = embd.shape[0]  # the random prompt's ids stay below it

    def side(device, name, n):
        spec = common | {"device": device, "side": name, "threads": n, "n_vocab": n_vocab}
        spec["backend"] = backend if device == "cpu" else device
        r = run_child(spec)
        if log:
            what = r.get("unavailable") or (
                f"pp{n_prompt} {r['pp']:.1f} tok/s, tg{n_gen} {r['tg']:.1f} tok/s, "
                f"peak RSS {r['rss_bytes'] / 2**20:.0f} MB"
            )
            where = f"{device} t={n}" if device == "cpu" else device
            log(f"{os.path.basename(model)} {where} {name}: {what}")
        return r

    result = common | {"file_bytes": os.path.getsize(model), "backend": backend, "devices": list(devices)}
    result["weight_bytes_per_token"] = weight_bytes_per_token(model)
    result["runs"] = []
    n_sides = 2 if llama else 1  # pyquant, and its peer
    if "cpu" in devices:
        for n in threads:
            result["runs"].append({"threads": n} | {s: side("cpu", s, n) for s in DEVICES["cpu"][:n_sides]})
    if "cuda" in devices:
        cu = result["cuda"] = {s: side("cuda", s, max(threads)) for s in DEVICES["cuda"][:n_sides]}
        ours = cu["pyquant"]
        cu["roofline"] = result["weight_bytes_per_token"] * ours["tg"] / ours["bandwidth_bytes_s"]
    return result


def _pairs(result: dict) -> list[tuple[str, str, dict, str, dict | None]]:
    """(device, threads, pyquant's SIDE, peer name, the peer's SIDE or None without peers) in table order:
    cpu per thread count, then cuda."""
    cpu_peer, cuda_peer = DEVICES["cpu"][1], DEVICES["cuda"][1]
    pairs = [("cpu", str(r["threads"]), r["pyquant"], cpu_peer, r.get(cpu_peer)) for r in result["runs"]]
    if "cuda" in result:
        cu = result["cuda"]
        pairs.append(("cuda", "-", cu["pyquant"], cuda_peer, cu.get(cuda_peer)))
    return pairs


def table(result: dict) -> str:
    """Markdown tables: tok/s of every engine, ours against its peer, the cuda roofline; peak RSS and TTFT."""
    pp, tg = f"pp{result['n_prompt']}", f"tg{result['n_gen']}"
    lines = [
        f"{os.path.basename(result['model'])} ({result['file_bytes'] / 2**20:.0f} MB, "
        + f"KV {result['cache_type']}, medians of {result['reps']})",
        "",
        f"| device | engine | threads | {pp} tok/s | {tg} tok/s | ratio vs peer ({pp} / {tg}) | roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    rss = [
        "",
        "| device | engine | threads | peak RSS MB | limit MB | time to first token s |",
        "|---|---|---|---|---|---|",
    ]
    for device, threads, ours, peer_name, peer in _pairs(result):
        ratio, roof = "-", "-"
        if peer and "unavailable" not in peer:
            ratio = f"{ours['pp'] / peer['pp']:.2f}x / {ours['tg'] / peer['tg']:.2f}x"
        if device == "cuda":
            mb, gb = result["weight_bytes_per_token"] / 1e6, ours["bandwidth_bytes_s"] / 1e9
            roof = f"{result['cuda']['roofline'] * 100:.3g}% ({mb:.3g} MB/token of {gb:.3g} GB/s)"
        limit = (result["file_bytes"] + (ours.get("kv_bytes") or 0) + RSS_ALLOWANCE) / 2**20
        for engine, r in (("pyquant", ours), (peer_name, peer)):
            if r is None:
                continue
            head = f"| {device} | {engine} | {threads} |"
            if "unavailable" in r:
                lines.append(f"{head} - | - | unavailable: {r['unavailable']} | - |")
                continue
            lines.append(f"{head} {r['pp']:.1f} | {r['tg']:.1f} | {ratio} | {roof} |")
            ratio, roof = "-", "-"  # on our row only
            rss.append(f"{head} {r['rss_bytes'] / 2**20:.0f} | {limit:.0f} | {r['ttft_s']:.2f} |")
    return "\n".join(lines + rss)


def plot(results: list[dict], path: str) -> None:
    """Grouped bars of tok/s, pp and tg side by side: one group per model, device and thread count, ours
    beside its peer (an unavailable one has no bar); log scale when the bars span more than 20x. Written
    atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .gguf import atomic_output

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("pp", "tg")):
        labels, ours, peers, names = [], [], [], []
        for res in results:
            model = os.path.basename(res["model"]).split("-")[0]
            for device, threads, r, peer_name, peer in _pairs(res):
                labels.append(f"{model}\n{device}" + (f" {threads}t" if device == "cpu" else ""))
                ours.append(r[key])
                peers.append(peer.get(key, float("nan")) if peer else float("nan"))
                names += [peer_name] if peer_name not in names and peer else []
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="pyquant")
        ax.bar([x + 0.2 for x in xs], peers, 0.4, label=" / ".join(names) or "peer")
        ax.set_xticks(list(xs), labels)
        vals = [v for v in ours + peers if v == v and v > 0]  # v == v: not NaN
        if vals and max(vals) > 20 * min(vals):
            ax.set_yscale("log")
        n = results[0]["n_prompt"] if key == "pp" else results[0]["n_gen"]
        ax.set_title(f"{key}{n} (tok/s, higher is better)")
        ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1][1:] or "png")
    plt.close(fig)


def run(args) -> int:
    from .errors import PyquantError
    from .gguf import atomic_output
    from .models import model_path

    model = os.fspath(args.model or model_path("qwen"))
    if not os.path.isfile(model):
        raise PyquantError(f"no such model file: {model}")
    try:
        threads = [int(t) for t in args.threads.split(",") if t]
    except ValueError:
        raise PyquantError(f"--threads takes comma-separated integers, not {args.threads!r}") from None
    if not threads or min(threads) < 1:
        raise PyquantError(f"--threads takes positive integers, not {args.threads!r}")
    counts = {"--n-prompt": args.n_prompt, "--n-gen": args.n_gen, "--repetitions": args.repetitions}
    for flag, value in counts.items():
        if value < 1:
            raise PyquantError(f"{flag} takes a positive integer, not {value}")
    devices = [d for d in args.device.split(",") if d]
    unknown = [d for d in devices if d not in DEVICES]
    if unknown or not devices:
        raise PyquantError(f"--device takes a comma list of {', '.join(DEVICES)}, not {args.device!r}")
    result = bench(
        model,
        threads,
        args.n_prompt,
        args.n_gen,
        args.repetitions,
        args.backend,
        args.cache_type,
        not args.no_llama,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        devices=devices,
    )
    print(table(result))
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot([result], args.plot)
    return 0
