"""End-to-end throughput on the GPU machine: pyquant's CPU backend vs its CUDA backend vs transformers fp16
(the GPU peer, on the same weights), on random-weight models of the two real models' shapes, plus the int8
GEMM at M = N = K = 4096 against torch._int_mm and the decode roofline.

The real GGUF files cannot travel to the GPU machine, so each model is rebuilt there: transformers makes a
random fp16 checkpoint from the real config.json (bench/models/NAME), and `pyquant convert --type q4_k_m`
turns it into a GGUF with the real files' type mix. Measures, as llama-bench does: pp512 (one forward pass
over 512 tokens; median of 5 after a warm-up) and tg128 (128 tokens of greedy generation from an empty
context; median of 3 runs). pyquant's tg_tok_s is `Transformer.greedy` in chunks of generate.GREEDY_CHUNK, as
`pyquant run --temp 0` generates (on CUDA the argmax runs on the device: one host round trip a chunk);
tg_logits_tok_s is one forward a token with the logits copied to the host and argmaxed there. Prints one
table, writes e2e_gpu.json and e2e_gpu.png to --out.

    python bench/e2e_gpu.py --out $OUT [--models qwen gemma] [--cpu-tg 16]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import lzma
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ROOT / "bench" / "models"


def _bench_helpers():
    """This checkout's pyquant/bench.py, loaded by path: with --code the `pyquant` package is the baseline's,
    which may predate device_bandwidth and weight_bytes_per_token (they import the rest lazily)."""
    spec = importlib.util.spec_from_file_location("pyquant_bench_here", ROOT / "pyquant" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---- models ----------------------------------------------------------------------------------------------


def build(name: str, work: Path) -> tuple[Path, Path]:
    """(HF checkpoint folder, q4_k_m GGUF) of a random-weight model shaped as the real `name`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from converters.hf_to_gguf import convert

    hf = work / f"hf-{name}"
    gguf = work / f"{name}-q4_k_m.gguf"
    if gguf.exists() and (hf / "model.safetensors").exists():  # built by an earlier run in this machine
        return hf, gguf
    hf.mkdir(parents=True, exist_ok=True)
    for f in (MODELS / name).iterdir():
        if f.suffix == ".xz":
            (hf / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
        else:
            shutil.copy(f, hf / f.name)
    t0 = time.time()
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(hf)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model.save_pretrained(hf, safe_serialization=True)
    del model
    convert(hf, gguf, "q4_k_m")
    log(f"built {name}: {time.time() - t0:.1f} s")
    return hf, gguf


# ---- runs ------------------------------------------------------------------------------------------------


def run_pyquant(gguf: Path, backend: str, n_pp: int, n_tg: int) -> dict:
    from pyquant.backend import make_backend
    from pyquant.gguf import GGUFFile
    from pyquant.model import Transformer

    be = make_backend(backend)
    m = Transformer(GGUFFile(gguf), be)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, m.hp.n_vocab, n_pp)
    cache = m.new_cache(n_pp + n_tg + 8)
    t0 = time.perf_counter()
    m.forward(prompt, 0, cache)  # compiles
    warm_s = time.perf_counter() - t0
    pp = []
    for _ in range(5):
        t0 = time.perf_counter()
        m.forward(prompt, 0, cache)
        pp.append(time.perf_counter() - t0)
    q = getattr(be, "queue", None)
    pp_items = list(q.last_sig or ()) if q is not None else []  # the prefill's launches (one flush)
    pp_split = {}
    if q is not None and q.graph is not None and q.graph_sig == q.last_sig:  # the prefill replayed as a graph
        g = []
        for _ in range(5):  # the device side alone
            t0 = time.perf_counter()
            q.graph.launch(q.core_stream)
            q.synchronize()
            g.append(time.perf_counter() - t0)
        b = []
        with launches_dropped(q):
            for _ in range(5):  # the host side alone: the pass queued in Python, nothing launched
                t0 = time.perf_counter()
                m.forward(prompt, 0, cache)
                b.append(time.perf_counter() - t0)
        pp_split = {"pp_graph_ms": float(np.median(g)) * 1e3, "pp_build_ms": float(np.median(b)) * 1e3}
    tok = int(prompt[0])
    for i in range(3):  # compiles, then captures the decode graph
        m.forward(np.array([tok]), i, cache)
    try:
        from pyquant.generate import GREEDY_CHUNK as chunk
    except ImportError:  # a baseline without greedy chunks (and without replay_greedy)
        chunk = 16
    chunk = max(chunk, 1)
    greedy = getattr(m, "greedy", None)
    fast = greedy is not None and hasattr(be, "replay_greedy")  # elsewhere greedy is the per-token loop
    if fast:
        greedy(tok, 0, cache, chunk)  # compiles the argmax, captures the step + argmax graph

    def tg_greedy():  # as generate_tokens does at temperature 0
        t, first = tok, time.perf_counter()
        for i in range(0, n_tg, chunk):
            t = int(greedy(t, i, cache, min(chunk, n_tg - i))[-1])
        return time.perf_counter() - first

    def tg_logits():  # one forward a token, logits to the host, numpy's argmax
        t, first = tok, time.perf_counter()
        for i in range(n_tg):
            t = int(np.argmax(m.forward(np.array([t]), i, cache)))
        return time.perf_counter() - first

    tg, tgl = [], []
    for _ in range(3):
        tgl.append(tg_logits())
        if fast:
            tg.append(tg_greedy())
    tg = tg or tgl
    tg_s = float(np.median(tg))
    res = {"pp_tok_s": n_pp / float(np.median(pp)), "tg_tok_s": n_tg / tg_s,
           "tg_logits_tok_s": n_tg / float(np.median(tgl)), "n_pp": n_pp, "n_tg": n_tg, "warm_s": warm_s,
           "pp_s_runs": [round(x, 4) for x in pp], "tg_s_runs": [round(x, 4) for x in tg],
           "tg_logits_s_runs": [round(x, 4) for x in tgl], **pp_split}
    if q is not None:
        res["graph_launches"] = q.n_graph_launches
        res["replays"] = getattr(be, "n_replays", 0)
        res["kernels_per_token"] = len(q.last_sig or ())
        step = getattr(be, "_step", None)
        graph = step.graph if step is not None and step.graph is not None else q.graph
        if graph is not None:  # the device side alone: the captured step replayed
            q.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                graph.launch(q.core_stream)
            q.synchronize()
            res["graph_ms_per_token"] = (time.perf_counter() - t0) / 50 * 1e3
            # everything but the graph: in greedy generation the argmax kernel and a round trip a chunk; with
            # logits the parameter copy, launch, logits copy, numpy's argmax (and any Python rebuild)
            res["host_ms_per_token"] = tg_s / n_tg * 1e3 - res["graph_ms_per_token"]
            res["host_logits_ms_per_token"] = 1e3 / res["tg_logits_tok_s"] - res["graph_ms_per_token"]
        res["kernel_us"] = kernel_profile(q, q.last_sig)
        res["prefill_kernel_us"] = kernel_profile(q, pp_items, reps=3)
        res["kernel_resources"] = kernel_resources()
        t0 = time.perf_counter()  # building the step in Python: ops queued, nothing launched
        build = getattr(m, "_forward", None)  # (a baseline without step replay: forward itself)
        with launches_dropped(q):
            for i in range(20):
                build(np.array([tok]), i, cache, False) if build else m.forward(np.array([tok]), i, cache)
        res["build_ms_per_token"] = (time.perf_counter() - t0) / 20 * 1e3
    return res


def kernel_resources() -> dict:
    """Registers and local memory (bytes) per thread of each compiled GEMV / attention kernel (the blocks a
    multiprocessor holds: 65536 registers / (registers x threads a block))."""
    from kernels_cuda import attention, matvec

    out = {}
    for table in (matvec._GEMV, getattr(matvec, "_GEMV1", {}), attention._ATTEND, getattr(attention, "_ROPE_STORE", {})):
        for key, k in table.items():
            try:
                regs, local = k.get_regs_per_thread(), k.get_local_mem_per_thread()
                out[str(key)] = [max(regs.values()), max(local.values())] if isinstance(regs, dict) else [regs, local]
            except Exception as e:  # not compiled, or an older numba-cuda
                out[str(key)] = str(e)[:80]
    return out


@contextlib.contextmanager
def launches_dropped(q):
    """The launch queue's flush replaced by one that forgets the queued launches and parameters (what a flush
    resets, nothing run): times the Python that queues a pass."""
    def drop():
        q.items, q.n_params, q.pos0 = [], 1, None

    flush, q.flush = q.flush, drop
    try:
        yield
    finally:
        q.flush = flush


def kernel_profile(q, items, reps: int = 20) -> dict:
    """GPU time of one decode step's kernels by kernel and grid, in microseconds: each launch captured `reps`
    times into a graph of its own, replayed, timed and divided (so no host launch gap is counted)."""
    times: dict = {}
    for kern, grid, block, args in items:
        gb = q.device.create_graph_builder()
        gb.begin_building()
        for _ in range(reps):
            kern[grid, block, gb](*args)
        g = gb.end_building().complete()
        g.launch(q.core_stream)
        q.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            g.launch(q.core_stream)
        q.synchronize()
        us = (time.perf_counter() - t0) / (3 * reps) * 1e6
        name = getattr(kern, "__name__", None) or getattr(getattr(kern, "py_func", None), "__name__", "?")
        name = f"{name}{tuple(grid) if isinstance(grid, tuple) else (grid,)}"
        n, t = times.get(name, (0, 0.0))
        times[name] = (n + 1, t + us)
    top = {k: [n, round(t, 1)] for k, (n, t) in sorted(times.items(), key=lambda kv: -kv[1][1])[:16]}
    top["total"] = round(sum(t for _, t in times.values()), 1)
    return top


def run_transformers(hf: Path, n_pp: int, n_tg: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float16).cuda().eval()
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, model.config.vocab_size, n_pp)[None], device="cuda")
    with torch.no_grad():
        model(ids)
        torch.cuda.synchronize()
        pp = []
        for _ in range(2):
            t0 = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            pp.append(time.perf_counter() - t0)

        def decode(n):
            cache = DynamicCache()
            tok = ids[:, :1]
            for _ in range(n):
                out = model(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()

        decode(4)
        t0 = time.perf_counter()
        decode(n_tg)
        tg_s = time.perf_counter() - t0
    return {"pp_tok_s": n_pp / min(pp), "tg_tok_s": n_tg / tg_s, "n_pp": n_pp, "n_tg": n_tg}


def int8_gemm(n: int = 4096, reps: int = 10) -> dict:
    import torch
    from numba import cuda

    from kernels_cuda import gemm_int8 as g8

    a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device="cuda")  # (N, K)
    ref = torch._int_mm(a, b.t())

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    ops = 2 * n**3
    res = {"torch_int_mm_tops": ops / timed(lambda: torch._int_mm(a, b.t())) / 1e12}
    da, db = cuda.as_cuda_array(a.view(torch.int32)), cuda.as_cuda_array(b.view(torch.int32))
    for name, kern, grid in (("mma", g8.gemm_s8_mma, g8.gemm_grid(n, n)),
                             ("dp4a", g8.gemm_s8_dp4a, ((n // 64, n // 64), 256))):
        c = torch.empty((n, n), dtype=torch.int32, device="cuda")
        dc = cuda.as_cuda_array(c)
        t = timed(lambda: kern[grid](dc, da, db, n, n, n // 4))
        res[f"{name}_tops"] = ops / t / 1e12
        res[f"{name}_exact"] = bool(torch.equal(c, ref))
    res["mma_vs_torch"] = res["mma_tops"] / res["torch_int_mm_tops"]
    return res


# ---- report ----------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = [f"{'model':8} {'engine':22} {'pp512 tok/s':>12} {'tg128 tok/s':>12}"]
    for name, r in results["models"].items():
        for eng in ("cpu", "cuda", "transformers_fp16"):
            e = r.get(eng)
            if isinstance(e, dict) and "pp_tok_s" in e:
                lines.append(f"{name:8} {eng:22} {e['pp_tok_s']:12.1f} {e['tg_tok_s']:12.1f}"
                             + (f"   (tg over {e['n_tg']} tokens)" if e["n_tg"] != 128 else ""))
            elif e is not None:
                lines.append(f"{name:8} {eng:22} {'error: ' + str(e)[:60]}")
        c, t = r.get("cuda"), r.get("transformers_fp16")
        if isinstance(c, dict) and "tg_tok_s" in c:
            lines.append(f"{name:8} cuda decode roofline: {r['weight_mb_per_token']:.0f} MB/token x "
                         f"{c['tg_tok_s']:.0f} tok/s = {r['roofline_fraction'] * 100:.1f}% of "
                         f"{results['hbm_tb_s']:.2f} TB/s; {c.get('kernels_per_token')} kernels/token; per token: "
                         f"host {c.get('host_ms_per_token', 0):.2f} ms, graph replay {c.get('graph_ms_per_token', 0):.2f} ms "
                         f"(kernels alone {c.get('kernel_us', {}).get('total', 0) / 1e3:.2f} ms); "
                         f"with the logits to the host a token: tg {c.get('tg_logits_tok_s', 0):.0f} tok/s, host "
                         f"{c.get('host_logits_ms_per_token', 0):.2f} ms; "
                         f"a rebuilt step {c.get('build_ms_per_token', 0):.2f} ms")
            if "pp_graph_ms" in c:
                lines.append(f"{name:8} cuda prefill pp{c['n_pp']}: {1e3 * c['n_pp'] / c['pp_tok_s']:.1f} ms a pass = "
                             f"graph replay {c['pp_graph_ms']:.1f} ms (kernels alone "
                             f"{c.get('prefill_kernel_us', {}).get('total', 0) / 1e3:.1f} ms) + the rest; the pass "
                             f"queued in Python alone {c['pp_build_ms']:.1f} ms")
            if isinstance(t, dict):
                lines.append(f"{name:8} cuda / transformers: pp {c['pp_tok_s'] / t['pp_tok_s']:.2f}x, "
                             f"tg {c['tg_tok_s'] / t['tg_tok_s']:.2f}x")
    g = results.get("int8_gemm")
    if isinstance(g, dict):
        lines.append(f"int8 GEMM 4096^3: mma {g['mma_tops']:.1f} TOPS (exact {g['mma_exact']}), dp4a "
                     f"{g['dp4a_tops']:.1f} TOPS (exact {g['dp4a_exact']}), torch._int_mm {g['torch_int_mm_tops']:.1f}"
                     f" TOPS; mma/torch {g['mma_vs_torch']:.2f}x")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    engines = ("cpu", "cuda", "transformers_fp16")
    for ax, key, title in ((axes[0], "pp_tok_s", "prefill pp512"), (axes[1], "tg_tok_s", "decode tg128")):
        names = list(results["models"])
        for j, eng in enumerate(engines):
            vals = [results["models"][n].get(eng, {}).get(key, 0) if isinstance(results["models"][n].get(eng), dict)
                    else 0 for n in names]
            ax.bar(np.arange(len(names)) + 0.27 * (j - 1), vals, 0.27, label=eng)
        ax.set_xticks(range(len(names)), names)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pyquant-e2e"))
    ap.add_argument("--models", nargs="+", default=["qwen", "gemma"])
    ap.add_argument("--cpu-tg", type=int, default=16, help="decode steps timed on the CPU backend")
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers fp16 and the int8 GEMM")
    ap.add_argument("--code", type=Path, help="import pyquant and kernels_cuda from here (a baseline checkout)")
    args = ap.parse_args()
    if args.code:
        sys.path.insert(0, str(args.code.resolve()))
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"models": {}}
    helpers = _bench_helpers()
    try:
        results["hbm_tb_s"] = helpers.device_bandwidth()[0] / 1e12
        if not args.no_peer:
            results["int8_gemm"] = int8_gemm()
    except Exception as e:  # report and go on
        results["int8_gemm"] = f"{type(e).__name__}: {e}"
    log(json.dumps(results))
    built = {}
    for name in args.models:  # the GPU engines first, the slow CPU runs last
        r = results["models"][name] = {}
        try:
            hf, gguf = built[name] = build(name, args.work)
            r["weight_mb_per_token"] = helpers.weight_bytes_per_token(gguf) / 1e6
            r["cuda"] = run_pyquant(gguf, "cuda", 512, 128)
            r["roofline_fraction"] = r["weight_mb_per_token"] * 1e6 * r["cuda"]["tg_tok_s"] / (results["hbm_tb_s"] * 1e12)
            log(name, "cuda", r["cuda"])
            if not args.no_peer:
                r["transformers_fp16"] = run_transformers(hf, 512, 128)
                log(name, "transformers", r["transformers_fp16"])
        except Exception as e:
            traceback.print_exc()
            r.setdefault("error", f"{type(e).__name__}: {e}")
        (args.out / "e2e_gpu.json").write_text(json.dumps(results, indent=2))
    print(table(results), flush=True)
    for name in [] if args.no_cpu else list(built):
        try:
            results["models"][name]["cpu"] = run_pyquant(built[name][1], "cpu", 512, args.cpu_tg)
            log(name, "cpu", results["models"][name]["cpu"])
        except Exception as e:
            traceback.print_exc()
            results["models"][name]["cpu"] = f"{type(e).__name__}: {e}"
        (args.out / "e2e_gpu.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "e2e_gpu.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
