"""The layer-sequential calibration driver every PTQ method runs through (GPTQ's recipe, Frantar et al. 2022):

1. load the Hugging Face model in float32 on the CPU; run the calibration windows up to the first decoder
   layer and keep that layer's inputs (and the keyword arguments the model passes each layer: masks, RoPE);
2. for each decoder layer: hand it to the method, which captures what it needs with forward hooks on the
   layer's linears (`LayerContext.capture`), rescales (`LayerContext.fold`) and quantizes them in place
   (the float weights replaced by their dequantized values), returning one record per linear;
3. run the quantized layer on its inputs to get the next layer's inputs, so each layer is calibrated on
   what the quantized model before it produces.

Methods that need no calibration (RTN, LLM.int8()) skip the forward passes. The result is the modified
model (folded norms and biases) plus the per-linear records; pyquant/ptq/export.py writes them as GGUF.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

import torch

from .calib import CalibConfig, calibration_tokens
from .layouts import Fold, Layout, layout_for

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer while the model runs once: keeps the keyword arguments (and layer 0's
    input), passes the hidden states through, and stops the model after the last layer."""

    def __init__(self, index: int, last: bool, sink: dict):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.sink.setdefault("inputs", []).append(hidden_states.detach())
        self.sink.setdefault("kwargs", {}).setdefault(self.index, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


class LayerContext:
    """One decoder layer and its calibration inputs, with the operations methods are written in."""

    def __init__(
        self,
        index: int,
        layer: torch.nn.Module,
        layout: Layout,
        inputs: list,
        kwargs: dict,
        n_layers: int = 1,
    ):
        self.index, self.layer, self.layout, self.inputs, self.kwargs = index, layer, layout, inputs, kwargs
        self.n_layers = n_layers

    def module(self, name: str) -> torch.nn.Module:
        return attrgetter(name)(self.layer)

    @torch.no_grad()
    def forward(self) -> list[torch.Tensor]:
        return [self._call(x) for x in self.inputs]

    def _call(self, x):
        out = self.layer(x, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def capture(self, names, fn: Callable[[str, torch.Tensor], None]) -> None:
        """Run the layer on every input, calling fn(name, x (tokens, in)) with the input of each named module.
        The forward stops as soon as every named module has been reached: capturing q_proj's input costs a
        norm, not a layer."""
        self._hooked(names, lambda n, args, kwargs: fn(n, args[0].reshape(-1, args[0].shape[-1])), self.inputs)

    @torch.no_grad()
    def capture_calls(self, names, n_inputs: int) -> dict[str, list[tuple[tuple, dict]]]:
        """The (args, kwargs) each named module is called with on the first n_inputs inputs (whole windows, so
        a block such as self_attn can be run again on them); tensors are copies."""
        got: dict[str, list] = {n: [] for n in names}
        clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731

        def keep(n, args, kwargs):
            got[n].append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))

        self._hooked(names, keep, self.inputs[:n_inputs])
        return got

    def _hooked(self, names, fn: Callable, inputs) -> None:
        """Run the layer on each input with fn(name, args, kwargs) called before each named module; each
        forward stops once every named module has been reached."""
        names = list(names)
        seen: set[str] = set()

        def hook(n, args, kwargs):
            fn(n, args, kwargs)
            seen.add(n)
            if len(seen) == len(names):
                raise _Stop

        hooks = [
            self.module(n).register_forward_pre_hook(lambda m, a, k, n=n: hook(n, a, k), with_kwargs=True)
            for n in names
        ]
        try:
            for x in inputs:
                seen.clear()
                try:
                    self._call(x)
                except _Stop:
                    pass
        finally:
            for h in hooks:
                h.remove()

    def collect(self, names, max_tokens: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """The inputs of the named modules, (tokens, in) float32, the same `max_tokens` rows for every module."""
        got: dict[str, list] = {n: [] for n in names}
        self.capture(names, lambda n, x: got[n].append(x.detach().clone()))
        out = {n: torch.cat(v) for n, v in got.items()}
        if max_tokens:
            total = next(iter(out.values())).shape[0]
            if total > max_tokens:
                idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_tokens]
                out = {n: x[idx] for n, x in out.items()}
        return out

    def fold_ok(self, fold: Fold) -> bool:
        """A linear -> linear fold needs the previous linear's outputs to be the next one's inputs one to one
        (not the case for v_proj -> o_proj under grouped-query attention)."""
        if fold.kind != "linear":
            return True
        prev = self.module(fold.prev)
        return all(self.module(n).in_features == prev.out_features for n in fold.linears)

    @torch.no_grad()
    def fold(self, fold: Fold, s: torch.Tensor) -> None:
        """Divide the channels fold.prev outputs by s and multiply the linears' input columns by s."""
        prev = self.module(fold.prev)
        if fold.kind == "gemma_norm":  # output = x_hat * (1 + w)
            prev.weight.copy_((1 + prev.weight) / s - 1)
        elif fold.kind == "norm":
            prev.weight.div_(s)
        else:
            prev.weight.div_(s[:, None])
            if prev.bias is not None:
                prev.bias.div_(s)
        for n in fold.linears:
            self.module(n).weight.mul_(s[None, :])


@dataclass
class Result:
    """The calibrated model and, per linear (full HF module name), what the method made of it."""

    model: torch.nn.Module
    config: dict
    layout: Layout
    linears: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0


class Progress:
    """A one-line progress bar on stderr: layers done, the current step, elapsed and remaining time."""

    def __init__(self, total: int, stream=sys.stderr, enabled: bool = True):
        self.total, self.stream, self.enabled, self.t0 = total, stream, enabled, time.time()

    def __call__(self, done: int, what: str) -> None:
        if not self.enabled:
            return
        width, elapsed = 30, time.time() - self.t0
        fill = width * done // self.total
        eta = f"~{elapsed / done * (self.total - done):.0f}s left" if done else ""
        self.stream.write(
            f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} {what[:34]:<34} "
            f"{elapsed:.0f}s {eta:<14}"
        )
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def load_model(hf_dir: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from converters.hf_to_gguf import load_config

    hf_logging.disable_progress_bar()
    cfg, _ = load_config(Path(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    return model, cfg


@torch.no_grad()
def layer_inputs(model, layout: Layout, tokens) -> tuple[list[torch.Tensor], dict[int, dict]]:
    """Layer 0's input for each calibration window, and the keyword arguments each layer receives."""
    layers = attrgetter(layout.layers)(model)
    originals = list(layers)
    sink: dict = {}
    for i in range(len(layers)):
        layers[i] = _Recorder(i, i == len(layers) - 1, sink)
    try:
        for row in tokens:
            try:
                model(torch.as_tensor(row)[None], use_cache=False)
            except _Stop:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return sink["inputs"], sink["kwargs"]


def run(hf_dir: str | Path, method, calib: CalibConfig | None = None, progress: bool = True) -> Result:
    """Calibrate and quantize every decoder layer of the checkpoint in `hf_dir` with `method` (an object with
    `needs_calibration` and `quantize_layer(ctx) -> {linear name: record}`)."""
    t0 = time.time()
    torch.manual_seed(0)
    model, cfg = load_model(Path(hf_dir))
    layout = layout_for(cfg["model_type"])
    layers = attrgetter(layout.layers)(model)
    result = Result(model, cfg, layout)
    bar = Progress(len(layers), enabled=progress)
    inputs, kwargs = [], {}
    if method.needs_calibration:
        calib = calib or CalibConfig()
        bar(0, "calibration inputs")
        inputs, kwargs = layer_inputs(model, layout, calibration_tokens(Path(hf_dir), calib))
    for i, layer in enumerate(layers):
        bar(i, f"layer {i}: {method.name}")
        ctx = LayerContext(i, layer, layout, inputs, kwargs.get(i, {}), len(layers))
        records = method.quantize_layer(ctx)
        prefix = f"{layout.layers}.{i}."
        result.linears.update({prefix + n: r for n, r in records.items()})
        if method.needs_calibration and i + 1 < len(layers):
            ctx.inputs = inputs = ctx.forward()
    bar(len(layers), "done")
    result.seconds = time.time() - t0
    return result
