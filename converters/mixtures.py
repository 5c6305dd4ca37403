"""Per-tensor ggml types for a file type (--type), following llama.cpp's llama_tensor_get_type.

Source: llama.cpp src/llama-quant.cpp (tensor_allows_quantization, llama_tensor_get_type_impl,
tensor_type_fallback), restricted to the file types pyquant writes:
- Only 2-D tensors whose names end in "weight", norms excepted, are quantized; the rest stay F32
  (F16/BF16 files keep 1-D tensors in F32 too, as convert_hf_to_gguf.py does).
- output.weight (and token_embd.weight when the embeddings are tied, i.e. there is no output.weight) gets Q6_K,
  or Q8_0 when its row length is not a multiple of the file type's block, or when the type is Q8_0.
- Q4_K_M / Q5_K_M: attn_v.weight and ffn_down get Q6_K where use_more_bits(i, n): the first and last eighth
  of the layers and every third layer in between. i counts tensors in llama.cpp's order: its weights_map is
  sorted by layer number, then name (weight_name_comparer in llama-model-loader.h; older llama.cpp sorted by
  name alone, blk.10 before blk.2, which is why some published Q4_K_M files show a different pattern).
- Fallbacks when the row length is not a multiple of 256: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0.
"""

from __future__ import annotations

import re

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from pyquant.errors import PyquantError

# --type name -> (GGUF general.file_type, default ggml type of the quantized tensors)
FILE_TYPES = {
    "f32": (LlamaFileType.ALL_F32, "f32"),
    "f16": (LlamaFileType.MOSTLY_F16, "f16"),
    "bf16": (LlamaFileType.MOSTLY_BF16, "bf16"),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, "q8_0"),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, "q4_0"),
    "q4_1": (LlamaFileType.MOSTLY_Q4_1, "q4_1"),
    "q5_0": (LlamaFileType.MOSTLY_Q5_0, "q5_0"),
    "q5_1": (LlamaFileType.MOSTLY_Q5_1, "q5_1"),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, "q4_k"),
    "q5_k_m": (LlamaFileType.MOSTLY_Q5_K_M, "q5_k"),
    "q6_k": (LlamaFileType.MOSTLY_Q6_K, "q6_k"),
}
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
PLAIN = ("f32", "f16", "bf16")


def block_size(t: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]][0]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def llama_order(name: str) -> tuple[int, str]:
    """llama.cpp's weight_name_comparer: tensors outside blocks first, then by block number, then by name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and not name.endswith("_norm.weight")


def _fallback(name: str, t: str, n_cols: int) -> str:
    if n_cols % block_size(t) == 0:
        return t
    if t not in FALLBACK:
        raise PyquantError(
            f"tensor {name!r}: row length {n_cols} is not a multiple of the {t} block "
            f"({block_size(t)}) and {t} has no fallback type"
        )
    t = FALLBACK[t]
    return t if n_cols % block_size(t) == 0 else "f16"


def tensor_types(file_type: str, shapes: dict[str, tuple[int, ...]], n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, for tensors of the given numpy shapes (rows first)."""
    if file_type not in FILE_TYPES:
        raise PyquantError(f"unknown --type {file_type!r}; choose one of: {', '.join(FILE_TYPES)}")
    default = FILE_TYPES[file_type][1]
    tied = "output.weight" not in shapes
    n_attn_v = sum("attn_v.weight" in n for n in shapes)
    i_attn_v = i_ffn_down = 0
    out = {}
    for name in sorted(shapes, key=llama_order):
        shape = shapes[name]
        if not quantizable(name, shape):
            out[name] = "f32"
            continue
        if default in PLAIN:
            out[name] = default
            continue
        n_cols = shape[-1]
        t = default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if n_cols % block_size(default) != 0 or default == "q8_0":
                t = "q8_0"
            else:
                t = "q6_k"
        elif "attn_v.weight" in name:
            if file_type in ("q4_k_m", "q5_k_m") and use_more_bits(i_attn_v, n_attn_v):
                t = "q6_k"
            i_attn_v += 1
        elif "ffn_down" in name:
            if file_type in ("q4_k_m", "q5_k_m") and use_more_bits(i_ffn_down, n_layers):
                t = "q6_k"
            i_ffn_down += 1
        out[name] = _fallback(name, t, n_cols)
    return out
