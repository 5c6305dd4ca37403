"""Write a calibrated model (driver.Result) as GGUF, through the converter's plan: its metadata, tokenizer
export, tensor names, per-tensor fix-ups (Q/K permutation, Gemma's norm offset) and llama.cpp's type rules
for the tensors the method leaves alone (embeddings, output, norms).

- Linears whose codes a ggml type holds exactly (Q4_0, Q4_1, Q8_0) are written as that type: the file is a
  standard GGUF that llama.cpp runs.
- Otherwise every linear becomes pyquant tensors (pyquant/ptq/runtime.py documents them) and
  general.architecture becomes "<arch>+pyquant-<method>", which llama.cpp refuses as an unknown architecture.
The other tensors come from the calibrated model in memory (folded norms and biases included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters.hf_to_gguf import plan
from converters.mixtures import FILE_TYPES
from converters.tensor_map import TensorMap
from converters.vocab import METADATA_TYPES
from pyquant.errors import PyquantError
from pyquant.gguf.writer import TensorSpec, write_gguf
from pyquant.quants import quantize

from .grids import QuantWeight
from .runtime import GroupInt

ROW_TENSORS = ("weight", "scale", "min", "outlier", "outlier_scale", "outlier_min")  # indexed by output row


def composite_of(record, fmt: str):
    """What a record is written as: a QuantWeight as a GroupInt (gq, w8a8, int8_mixed), else itself (w4a4)."""
    if isinstance(record, QuantWeight):
        return GroupInt(record.codes, record.scale, record.zero, record.grid.bits)
    return record


def export(
    result,
    hf_dir: str | Path,
    output: str | Path,
    method: str,
    metadata: dict,
    fmt: str,
    embed_type: str,
    progress=None,
    extra: dict | None = None,
) -> Path:
    """fmt: "ggml" (every linear record is a QuantWeight with a ggml type) or a pyquant.linear.format.
    extra: more f32 tensors {GGUF name "blk.N.kv_k_*": (G, Dh) array in Hugging Face channel order}."""
    if embed_type not in FILE_TYPES:
        raise PyquantError(f"unknown embedding type {embed_type!r}; choose one of {', '.join(FILE_TYPES)}")
    p = plan(hf_dir, embed_type)
    arch, cfg = p.arch, p.cfg
    tmap = TensorMap(arch, int(cfg["num_hidden_layers"]))
    state = {}
    for hf_name, t in result.model.state_dict().items():
        g = tmap.gguf_name(hf_name)
        if g is not None:
            state.setdefault(g, t)  # tied models list the embedding twice
    records = {}
    for hf_name, rec in result.linears.items():
        g = tmap.gguf_name(hf_name + ".weight")
        records[g] = rec

    def plain(spec):
        def produce():
            x = arch.fix(spec.name, state[spec.name].detach().float().numpy(), cfg)
            return quantize(x[: spec.shape[0]] if spec.name == "token_embd.weight" else x, spec.type)

        return TensorSpec(spec.name, spec.type, spec.shape, produce)

    def rows(name, x):  # the converter's per-tensor fix (llama's Q/K row permutation) on row-indexed data
        return arch.fix(name, x, cfg)

    specs, ggml_types = [], set()
    for spec in p.specs:
        rec = records.get(spec.name)
        if rec is None:
            specs.append(plain(spec))
        elif fmt == "ggml":
            t = rec.ggml_type
            if t is None:
                raise PyquantError(f"{spec.name}: {rec.grid} group {rec.group} has no ggml type")
            ggml_types.add(t)
            specs.append(
                TensorSpec(spec.name, t, spec.shape, lambda n=spec.name, r=rec: rows(n, r.ggml_bytes()))
            )
        else:
            base = spec.name.removesuffix(".weight")
            for name, (ttype, arr) in composite_tensors(composite_of(rec, fmt), base).items():
                part = name[len(base) + 1 :]
                data = rows(spec.name, arr) if part in ROW_TENSORS else arr
                specs.append(TensorSpec(name, ttype, data.shape, lambda d=data: d))

    for name, arr in (extra or {}).items():  # per-(head, channel) K data: K's row order (llama's permutation)
        layer = name.split(".")[1]
        data = rows(f"blk.{layer}.attn_k.weight", arr.reshape(-1, 1)).reshape(arr.shape).astype(np.float32)
        specs.append(TensorSpec(name, "f32", data.shape, lambda d=data: d))

    meta = dict(p.metadata)
    meta["pyquant.method"] = method
    meta.update(metadata)
    if fmt == "ggml":
        if len(ggml_types) == 1:
            meta["general.file_type"] = int(FILE_TYPES[ggml_types.pop()][0])
    else:
        meta["pyquant.architecture"] = arch.name
        meta["pyquant.linear.format"] = fmt
        meta["general.architecture"] = f"{arch.name}+pyquant-{method}"
    return write_gguf(output, meta, specs, types=METADATA_TYPES, progress=progress)


def composite_tensors(obj, base: str) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF tensors of a composite linear: its GroupInt parts (and Atom's channel order)."""
    if isinstance(obj, GroupInt):
        return obj.tensors(base)
    out = obj.normal.tensors(base)  # runtime.W4A4
    out[f"{base}.perm"] = ("i32", obj.perm.astype(np.int32))
    if obj.outlier is not None:
        out.update(obj.outlier.tensors(base, "outlier"))
    return out
