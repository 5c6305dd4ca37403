"""`pyquant inspect FILE`: metadata (long arrays summarized), a tensor table, totals per type, bits per
weight and parameter count; `--json` prints one object for machines."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np

from .gguf import GGUFFile

ARRAY_PREVIEW = 6


def add_arguments(p):
    p.add_argument("file", help="GGUF file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tensors", action="store_true", help="list every tensor (the table shows the first 40)")


def _plain(value):
    """JSON-ready: arrays as lists; NaN and infinities (JSON has none) as the strings "nan", "inf", "-inf"."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return [_plain(float(v)) for v in value]
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _summary(value) -> str:
    if isinstance(value, (list, np.ndarray)):
        head = value[:ARRAY_PREVIEW]
        items = head.tolist() if isinstance(head, np.ndarray) else list(head)
        more = f", ... ({len(value)} items)" if len(value) > ARRAY_PREVIEW else ""
        return "[" + ", ".join(repr(x) for x in items) + more + "]"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "...'" + f" ({len(value)} chars)"


def describe(path) -> dict:
    """The `--json` object: metadata and one row per tensor (type in lower-case ggml spelling)."""
    f = GGUFFile(path)
    return {
        "metadata": {k: _plain(v) for k, v in f.metadata.items()},
        "tensors": [
            {"name": t.name, "type": t.type, "shape": list(t.shape), "nbytes": t.nbytes, "offset": t.offset}
            for t in f.tensors.values()
        ],
    }


def run(args) -> int:
    if args.json:
        print(json.dumps(describe(args.file), ensure_ascii=False, allow_nan=False))
        return 0
    f = GGUFFile(args.file)
    print(f"{args.file}: GGUF v{f.version}, {len(f.metadata)} metadata keys, {len(f.tensors)} tensors, "
          f"data at offset {f.data_offset}, alignment {f.alignment}")
    print("\nmetadata:")
    width = max((len(k) for k in f.metadata), default=0)
    for key, value in f.metadata.items():
        print(f"  {key:<{width}}  {f.metadata_types[key][0].name.lower():<7} {_summary(value)}")

    rows = list(f.tensors.values())
    shown = rows if args.tensors else rows[:40]
    print(f"\ntensors{'' if args.tensors else ' (first 40; --tensors for all)' if len(rows) > 40 else ''}:")
    name_w = max((len(t.name) for t in shown), default=4)
    print(f"  {'name':<{name_w}}  {'type':<6} {'shape':<18} {'bytes':>12}")
    for t in shown:
        print(f"  {t.name:<{name_w}}  {t.type:<6} {'x'.join(map(str, t.shape)):<18} {t.nbytes:>12,}")

    per_type = defaultdict(lambda: [0, 0, 0])
    for t in rows:
        per_type[t.type][0] += 1
        per_type[t.type][1] += t.n_elements
        per_type[t.type][2] += t.nbytes
    n_params = sum(v[1] for v in per_type.values())
    n_bytes = sum(v[2] for v in per_type.values())
    print("\nper type:")
    print(f"  {'type':<6} {'tensors':>7} {'parameters':>14} {'bytes':>14} {'bpw':>6}")
    for ttype, (count, elems, nbytes) in sorted(per_type.items(), key=lambda kv: -kv[1][2]):
        print(f"  {ttype:<6} {count:>7} {elems:>14,} {nbytes:>14,} {8 * nbytes / elems:>6.2f}")
    bpw = f"{8 * n_bytes / n_params:.3f}" if n_params else "-"  # a vocabulary-only file has no tensors
    print(f"\nparameters: {n_params:,} ({n_params / 1e9:.3f} B)   tensor bytes: {n_bytes:,}   "
          f"bits per weight: {bpw}")
    return 0
