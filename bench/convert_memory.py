"""Conversion cost: wall time and peak resident memory of `pyquant convert` against the checkpoint's size.

Each conversion runs in its own child process (`python -m pyquant.cli convert ...`); its peak RSS is the
child's ru_maxrss from os.wait4, so the parent's memory never counts. A first row runs the same interpreter
with the converter imported and nothing converted: the floor every conversion pays for numpy, gguf, tokenizers.

    python bench/convert_memory.py                        # the real Qwen2.5-Coder-0.5B HF checkpoint, q4_k_m and f16
    python bench/convert_memory.py --types f16 q8_0 --checkpoint DIR
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(args: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit status) of `python ARGS` in a child process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(args)}\n{err}")
    return wall, usage.ru_maxrss * 1024, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint", help="HF checkpoint folder (default: the real Qwen checkpoint, built once)"
    )
    ap.add_argument("--types", nargs="+", default=["q4_k_m", "f16"])
    args = ap.parse_args()
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        sys.path.insert(0, str(ROOT))
        from converters.checkpoints import real_checkpoint

        ckpt = real_checkpoint("qwen")
    weights = sum(p.stat().st_size for p in ckpt.iterdir() if p.suffix in (".safetensors", ".bin"))
    gib = 2**30
    rows = []
    wall, rss, _ = run_child(["-c", "import converters.hf_to_gguf"])
    rows.append(("(imports only)", wall, rss, 0))
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.types:
            out = Path(tmp) / f"out-{t}.gguf"
            wall, rss, _ = run_child(["-m", "pyquant.cli", "convert", str(ckpt), "-o", str(out), "--type", t])
            rows.append((t, wall, rss, out.stat().st_size))
            out.unlink()
    print(f"checkpoint: {ckpt} ({weights / gib:.2f} GiB of weights)")
    print(f"{'type':<16}{'wall s':>8}{'peak RSS GiB':>14}{'RSS / ckpt':>12}{'output GiB':>12}")
    for name, wall, rss, size in rows:
        print(f"{name:<16}{wall:>8.1f}{rss / gib:>14.2f}{rss / weights:>12.2f}{size / gib:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
