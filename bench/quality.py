"""Quality table over the quantization methods on a real checkpoint: builds every file (pyquant quantize,
llama.cpp's own quantizer for the Q4_0/Q4_K_M baselines), scores each with `pyquant eval`'s code (one model
per step, its row saved as JSON so an interrupted run resumes), and writes the table, JSON and a PNG.

    python bench/quality.py                       # real Qwen2.5-Coder-0.5B checkpoint, the table's rows
    python bench/quality.py --rows f16,"gptq q4_0" # a subset
    python bench/quality.py --readme              # also put the table and plot in README.md's quality section
    python bench/quality.py --list

Work files go to --work (default ~/.cache/pyquant/quality). A row's JSON is reused while it was scored on the
same backend after its file was built; llama.cpp's columns of an unchanged file are carried over from an
earlier JSON (they do not depend on pyquant's backend). On two CPU cores each calibrated method takes
10-60 minutes to build; scoring a row on the CPU backend takes a few minutes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyquant.evaluate import DEFAULT_TEXT, Row, evaluate, plot, table

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- quality table: written by bench/quality.py --readme -->", "<!-- end of quality table -->"

# name -> how the file is made: ("llama.cpp", ftype) | ("convert", type) | ("pyquant", {quantize options})
ROWS = {
    "f16": ("convert", "f16"),
    "q4_k_m (llama.cpp)": ("llama.cpp", "MOSTLY_Q4_K_M"),
    "q4_0 rtn (llama.cpp)": ("llama.cpp", "MOSTLY_Q4_0"),
    "rtn q4_0 mse": ("pyquant", {"method": "rtn", "mse": True}),
    "gptq q4_0": ("pyquant", {"method": "gptq", "asym": False}),
    "gptq q4_1": ("pyquant", {"method": "gptq", "asym": True}),
    "gptq q4_1 mix": ("pyquant", {"method": "gptq", "asym": True, "mix": "sensitive"}),
    "awq q4_0": ("pyquant", {"method": "awq"}),
    "awq q4_1": ("pyquant", {"method": "awq", "asym": True}),
    "awq q4_1 mix": ("pyquant", {"method": "awq", "asym": True, "mix": "sensitive"}),
    "awq q4_0 clip": ("pyquant", {"method": "awq", "clip": True}),
    "q8_0 (llama.cpp)": ("llama.cpp", "MOSTLY_Q8_0"),
    "smoothquant q8_0": ("pyquant", {"method": "smoothquant"}),
    "smoothquant w8a8": ("pyquant", {"method": "smoothquant", "format": "w8a8"}),
    "llm_int8": ("pyquant", {"method": "llm_int8"}),
    "atom w4a4 kv4": ("pyquant", {"method": "atom"}),
    "atom w4a4 kv16": ("pyquant", {"method": "atom", "kv_bits": 0}),
    "w4a4 kv4 rtn": (
        "pyquant",
        {
            "method": "atom",
            "outliers": 0,
            "weight_algo": "rtn",
            "reorder": False,
            "w_clip": 1.0,
            "a_clip": 1.0,
        },
    ),
}

# the README table: baselines, the 4-bit methods' defaults and their best variants, then W8A8 and W4A4
TABLE = (
    "f16",
    "q4_k_m (llama.cpp)",
    "q4_0 rtn (llama.cpp)",
    "gptq q4_0",
    "gptq q4_1",
    "gptq q4_1 mix",
    "awq q4_0",
    "awq q4_0 clip",
    "awq q4_1",
    "awq q4_1 mix",
    "smoothquant q8_0",
    "smoothquant w8a8",
    "llm_int8",
    "atom w4a4 kv4",
    "atom w4a4 kv16",
    "w4a4 kv4 rtn",
)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def build(name: str, hf_dir: Path, work: Path, f16: Path, log) -> Path:
    kind, spec = ROWS[name]
    out = work / f"{slug(name)}.gguf"
    if out.exists():
        return out
    t0 = time.time()
    if kind == "convert":
        from converters.hf_to_gguf import convert

        convert(hf_dir, out, spec)
    elif kind == "llama.cpp":
        import llama_cpp

        build(next(n for n, (k, s) in ROWS.items() if k == "convert"), hf_dir, work, f16, log)
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_{spec}"), 2
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(p)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {f16} to {spec}")
    else:
        from pyquant.quantize import quantize

        opts = dict(spec)
        quantize(hf_dir, out, opts.pop("method"), **opts)
    log(f"built {out.name} in {time.time() - t0:.0f}s")
    return out


def score(name, path, f16, work, args, log) -> tuple[dict, Row]:
    """The row of one file: its JSON if scored on this backend since the file was built, else a new run
    (llama.cpp's columns carried over from the old JSON when the file is unchanged)."""
    cached = work / f"{slug(name)}.c{args.ctx}x{args.chunks}.json"
    old = json.loads(cached.read_text()) if cached.exists() else None
    unchanged = old is not None and cached.stat().st_mtime > path.stat().st_mtime
    if unchanged and old["row"]["runtime"] == f"pyquant-{args.backend}":
        return old["reference"], Row(**old["row"])
    carry = unchanged and old["row"].get("llama_ppl") is not None
    ref, (row,) = evaluate(
        [path], f16, args.text, args.ctx, args.chunks, args.backend, not carry, names=[name], log=log
    )
    if carry:
        for k in ("llama_ppl", "llama_prefill_tps", "llama_decode_tps"):
            setattr(row, k, old["row"][k])
    cached.write_text(json.dumps({"reference": ref, "row": asdict(row)}, indent=1))
    return ref, row


def write_readme(text: str, png: Path) -> None:
    """Replace what lies between README.md's quality-table markers with the table and the plot."""
    body = README.read_text(encoding="utf-8")
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{README} has no quality-table markers ({BEGIN} ... {END})")
    head, rest = body.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    rel = png.resolve().relative_to(README.parent)
    block = f"{BEGIN}\n{text}\n\n![PPL vs bits per weight, and KL divergence]({rel})\n{END}"
    README.write_text(head + block + tail, encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", help="HF checkpoint (default: converters.checkpoints.real_checkpoint('qwen'))")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "pyquant" / "quality"))
    p.add_argument("--rows", help="comma-separated row names (default: the README table's)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--backend", default="cpu", choices=("cpu", "numpy", "cuda"))
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--out", default="bench/quality", help="prefix of the .md/.json/.png outputs")
    p.add_argument("--readme", action="store_true", help="write the table and plot into README.md")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(ROWS))
        return 0
    log = lambda s: print(s, file=sys.stderr, flush=True)
    from converters.checkpoints import real_checkpoint

    hf = Path(args.hf) if args.hf else real_checkpoint("qwen")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = args.rows.split(",") if args.rows else list(TABLE)
    for n in names:
        if n not in ROWS:
            raise SystemExit(f"unknown row {n!r}; --list shows them")
    f16 = build("f16", hf, work, work / "f16.gguf", log)
    rows = []
    for n in names:
        path = build(n, hf, work, f16, log)
        if not args.build_only:
            ref, row = score(n, path, f16, work, args, log)
            rows.append(row)
    if args.build_only:
        return 0
    text = table(ref, rows)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text + "\n")
    Path(args.out + ".json").write_text(
        json.dumps({"reference": ref, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    plot(ref, rows, args.out + ".png")
    if args.readme:
        write_readme(text, Path(args.out + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
