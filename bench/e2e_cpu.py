"""End to end on both real models: pyquant's CPU backend against llama.cpp, pp512 and tg128 tok/s at 1 and 2
threads, peak RSS and time to first token, each side in its own child process (pyquant.bench).

    python bench/e2e_cpu.py [--models qwen,gemma] [-t 1,2] [-r 3] [--out out/]

Writes OUT/e2e_cpu.json, OUT/e2e_cpu.md (the tables) and OUT/e2e_cpu.png. Run it twice after a fresh
install: the first run also fills numba's compile cache, and its time to first token includes compiling.
The targets (issue #5, 2 threads): tg >= 1.0x llama.cpp, pp >= 0.5x, peak RSS <= file + KV cache + 300 MB,
warm time to first token <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyquant.bench import bench, plot, table
from pyquant.models import model_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="qwen,gemma")
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--cache-type", default="f16")
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    threads = [int(t) for t in args.threads.split(",")]
    results = []
    for name in args.models.split(","):
        path = os.fspath(model_path(name))
        results.append(
            bench(
                path,
                threads,
                args.n_prompt,
                args.n_gen,
                args.repetitions,
                "cpu",
                args.cache_type,
                log=lambda s: print(s, file=sys.stderr, flush=True),
            )
        )
    tables = "\n\n".join(table(r) for r in results)
    print(tables)
    with open(os.path.join(args.out, "e2e_cpu.md"), "w") as f:
        f.write(tables + "\n")
    with open(os.path.join(args.out, "e2e_cpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "e2e_cpu.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
