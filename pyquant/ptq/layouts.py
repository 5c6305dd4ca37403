"""Per-architecture quantization knowledge, as data: where the decoder layers live, the order in which a
layer's linears are quantized (GPTQ's true-sequential groups), and which op feeds which linears (the
scale-folding pairs that AWQ, SmoothQuant and Atom's reordering use).

Names are Hugging Face module paths relative to a decoder layer (`self_attn.q_proj`). A `Fold` says: the
output channels of `prev` are the input channels of `linears`, so dividing those channels by s in `prev`
(a norm's weight, or a linear's rows and bias) and multiplying the linears' columns by s leaves the float
model unchanged. `gemma` norms scale by (1 + w), so their fold is applied to (1 + w).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyquant.errors import PyquantError

Q, K, V, O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"


@dataclass(frozen=True)
class Fold:
    prev: str  # module whose output channels feed `linears`
    linears: tuple[str, ...]
    kind: str  # "norm" | "gemma_norm" | "linear"
    block: str = ""  # the module whose output AWQ's scale search compares (default: the first linear)


@dataclass(frozen=True)
class Layout:
    layers: str  # attribute path of the decoder layer list in the causal-LM module
    sequential: tuple[tuple[str, ...], ...]  # true-sequential groups; each group shares one input
    folds: tuple[Fold, ...]  # norm -> linears first, then linear -> linear pairs

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for group in self.sequential for n in group)

    def fold_of(self, linear: str) -> Fold:
        return next(f for f in self.folds if linear in f.linears)


_LLAMA_SEQ = ((Q, K, V), (O,), (GATE, UP), (DOWN,))

LAYOUTS = {
    "llama": Layout(
        "model.layers",
        _LLAMA_SEQ,
        (
            Fold("input_layernorm", (Q, K, V), "norm", "self_attn"),
            Fold(V, (O,), "linear"),
            Fold("post_attention_layernorm", (GATE, UP), "norm", "mlp"),
            Fold(UP, (DOWN,), "linear"),
        ),
    ),
    "gemma3": Layout(
        "model.layers",
        _LLAMA_SEQ,
        (
            Fold("input_layernorm", (Q, K, V), "gemma_norm", "self_attn"),
            Fold(V, (O,), "linear"),
            Fold("pre_feedforward_layernorm", (GATE, UP), "gemma_norm", "mlp"),
            Fold(UP, (DOWN,), "linear"),
        ),
    ),
}
LAYOUTS["qwen2"] = LAYOUTS["mistral"] = LAYOUTS["llama"]
LAYOUTS["gemma3_text"] = LAYOUTS["gemma3"]


def layout_for(model_type: str) -> Layout:
    if model_type not in LAYOUTS:
        raise PyquantError(
            f"no quantization layout for model_type {model_type!r}; known: {', '.join(LAYOUTS)}"
        )
    return LAYOUTS[model_type]
