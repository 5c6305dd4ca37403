"""`pyquant bench`: prompt processing and generation speed against llama.cpp, as llama-bench measures them.

For each thread count, each side runs in its own child process on the same GGUF file and the same random
token ids: pp (one forward of an n_prompt-token prompt, tok/s), tg (n_gen single-token steps from an empty
context, tok/s), medians over the repetitions; the first run of each side is a warm-up. The parent reads each
child's peak RSS from the kernel (os.wait4's rusage, the RUSAGE_CHILDREN accounting of that one child) and
its time to first token: from the child's start, imports and model load included, to the logits of an
8-token prompt (with numba's cache warm: run the bench twice after a fresh install).

    pyquant bench [-m FILE] [-t 1,2] [-p 512] [-n 128] [-r 3] [--json OUT] [--plot OUT.png]

llama.cpp is llama-cpp-python's `Llama(path, n_ctx, n_threads, n_batch=512)` timing `eval`, like llama-bench.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

SIDES = ("pyquant", "llama.cpp")
SHORT_PROMPT = 8
RSS_ALLOWANCE = 300 * 2**20  # the target: peak RSS <= file size + KV cache + 300 MB


# --- children ---------------------------------------------------------------------------------------------
def _tokens(n: int, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(1000, 20000, n).tolist()


def _measure_pyquant(spec: dict, t_start: float) -> dict:
    import numpy as np

    from pyquant.backend import make_backend
    from pyquant.gguf import GGUFFile
    from pyquant.model import Transformer

    n_ctx = spec["n_prompt"] + spec["n_gen"] + SHORT_PROMPT
    backend = make_backend(spec["backend"], threads=spec["threads"], cache_type=spec["cache_type"])
    model = Transformer(GGUFFile(spec["model"]), backend)
    cache = model.new_cache(n_ctx)
    model.forward(np.array(_tokens(SHORT_PROMPT, 1)), 0, cache)
    ttft = time.perf_counter() - t_start
    prompt, gen = np.array(_tokens(spec["n_prompt"])), _tokens(spec["n_gen"], 2)

    def pp():
        t = time.perf_counter()
        model.forward(prompt, 0, cache)
        return time.perf_counter() - t

    def tg():
        t = time.perf_counter()
        for i, tok in enumerate(gen):
            model.forward(np.array([tok]), i, cache)
        return time.perf_counter() - t

    return _repeat(spec, pp, tg) | {
        "ttft_s": ttft,
        "kv_bytes": cache.nbytes if hasattr(cache, "nbytes") else None,
    }


def _measure_llama(spec: dict, t_start: float) -> dict:
    import llama_cpp

    n_ctx = spec["n_prompt"] + spec["n_gen"] + SHORT_PROMPT
    llm = llama_cpp.Llama(
        spec["model"],
        n_ctx=n_ctx,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        n_batch=512,
        verbose=False,
    )
    llm.eval(_tokens(SHORT_PROMPT, 1))
    ttft = time.perf_counter() - t_start
    prompt, gen = _tokens(spec["n_prompt"]), _tokens(spec["n_gen"], 2)

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


def _repeat(spec: dict, pp, tg) -> dict:
    """Warm-up once, then alternate pp and tg runs; per-run tok/s and their medians."""
    import numpy as np

    pp(), tg()
    pp_s, tg_s = [], []
    for _ in range(spec["reps"]):
        pp_s.append(spec["n_prompt"] / pp())
        tg_s.append(spec["n_gen"] / tg())
    return {"pp": float(np.median(pp_s)), "tg": float(np.median(tg_s)), "pp_runs": pp_s, "tg_runs": tg_s}


def child_main(spec_json: str, out_path: str) -> None:
    t_start = time.perf_counter()
    spec = json.loads(spec_json)
    result = (_measure_llama if spec["side"] == "llama.cpp" else _measure_pyquant)(spec, t_start)
    with open(out_path, "w") as f:
        json.dump(result, f)


def run_child(spec: dict) -> dict:
    """Run one side in a fresh interpreter; its result plus the peak RSS the kernel accounted to it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        code = f"import sys; from pyquant.bench import child_main; child_main(sys.argv[1], {out!r})"
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{spec['side']} benchmark child failed (exit {proc.returncode})")
        with open(out) as f:
            result = json.load(f)
    result["rss_bytes"] = usage.ru_maxrss * 1024
    return result


# --- the command -------------------------------------------------------------------------------------------
def add_arguments(p):
    p.add_argument("-m", "--model", help="GGUF file (default: the Qwen2.5-Coder-0.5B-Instruct test model)")
    p.add_argument("-t", "--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens of the pp test")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens of the tg test")
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "numpy"], help="pyquant's backend")
    p.add_argument("--cache-type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"])
    p.add_argument("--no-llama", action="store_true", help="pyquant only")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
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
) -> dict:
    """Library form of the command: {"model", "file_bytes", "runs": [{"threads", "pyquant": {...}, ...}]}."""
    sides = SIDES if llama else SIDES[:1]
    runs = []
    for n in threads:
        row = {"threads": n}
        for side in sides:
            spec = {
                "side": side,
                "model": model,
                "threads": n,
                "n_prompt": n_prompt,
                "n_gen": n_gen,
                "reps": reps,
                "backend": backend,
                "cache_type": cache_type,
            }
            row[side] = run_child(spec)
            if log:
                log(
                    f"{os.path.basename(model)} {side} t={n}: pp{n_prompt} {row[side]['pp']:.1f} tok/s, "
                    f"tg{n_gen} {row[side]['tg']:.1f} tok/s, peak RSS {row[side]['rss_bytes'] / 2**20:.0f} MB"
                )
        runs.append(row)
    return {
        "model": model,
        "file_bytes": os.path.getsize(model),
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "reps": reps,
        "backend": backend,
        "cache_type": cache_type,
        "runs": runs,
    }


def table(result: dict) -> str:
    """Markdown table: tok/s of both sides, ratios, peak RSS against the target."""
    pp, tg = f"pp{result['n_prompt']}", f"tg{result['n_gen']}"
    lines = [
        f"{os.path.basename(result['model'])} ({result['file_bytes'] / 2**20:.0f} MB, KV {result['cache_type']}, "
        + f"medians of {result['reps']})",
        "",
        "| threads | test | pyquant tok/s | llama.cpp tok/s | ratio |",
        "|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        ours, ref = run["pyquant"], run.get("llama.cpp")
        for key, name in (("pp", pp), ("tg", tg)):
            theirs = f"{ref[key]:.1f}" if ref else "-"
            ratio = f"{ours[key] / ref[key]:.2f}x" if ref else "-"
            lines.append(f"| {run['threads']} | {name} | {ours[key]:.1f} | {theirs} | {ratio} |")
    lines += [
        "",
        "| threads | side | peak RSS MB | limit MB | time to first token s |",
        "|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for side in SIDES:
            if side in run:
                r = run[side]
                kv = run["pyquant"].get("kv_bytes") or 0
                limit = (result["file_bytes"] + kv + RSS_ALLOWANCE) / 2**20
                lines.append(
                    f"| {run['threads']} | {side} | {r['rss_bytes'] / 2**20:.0f} | {limit:.0f} | "
                    f"{r['ttft_s']:.2f} |"
                )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("pp", "tg")):
        labels, ours, theirs = [], [], []
        for res in results:
            for run in res["runs"]:
                labels.append(f"{os.path.basename(res['model']).split('-')[0]}\n{run['threads']}t")
                ours.append(run["pyquant"][key])
                theirs.append(run["llama.cpp"][key] if "llama.cpp" in run else 0)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="pyquant")
        ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="llama.cpp")
        ax.set_xticks(list(xs), labels)
        n = results[0]["n_prompt"] if key == "pp" else results[0]["n_gen"]
        ax.set_title(f"{key}{n} (tok/s, higher is better)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args) -> int:
    from .errors import PyquantError
    from .models import model_path

    model = os.fspath(args.model or model_path("qwen"))
    if not os.path.isfile(model):
        raise PyquantError(f"no such model file: {model}")
    try:
        threads = [int(t) for t in args.threads.split(",") if t]
    except ValueError:
        raise PyquantError(f"--threads takes comma-separated integers, not {args.threads!r}") from None
    llama = not args.no_llama
    if llama:
        try:
            import llama_cpp  # noqa: F401
        except ModuleNotFoundError:
            raise PyquantError(
                "the llama.cpp side needs llama-cpp-python: pip install 'pyquant[bench]' (or pass --no-llama)"
            ) from None
    result = bench(
        model,
        threads,
        args.n_prompt,
        args.n_gen,
        args.repetitions,
        args.backend,
        args.cache_type,
        llama,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot([result], args.plot)
    return 0
