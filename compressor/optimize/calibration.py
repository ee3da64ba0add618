"""Second moments of each linear layer's inputs over calibration text: GPTQ's Hessian, ``H = X^T X / n``.

The float model reads the user's text in windows; a forward hook on every layer to be quantized
adds its input's ``x^T x``. Layers that read the same tensor (q, k and v; gate and up) share one
matrix. The text is the user's own: never the text the result will be evaluated on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CompressorError
from ..text import text_windows


def float_model_and_windows(model_dir: Path, text_path: Path, tokens: int, seq_len: int):
    """The float model at ``model_dir`` (refusing a quantized folder) and the calibration text as its token windows."""
    from ..checks import load_tokenizer
    from ..loading import load, quant_method

    if quant_method(model_dir) != "float":
        raise CompressorError(model_dir, "calibration runs the float model: give the float checkpoint")
    windows = text_windows(load_tokenizer(model_dir), text_path, max(1, tokens // seq_len), seq_len)
    return load(model_dir, float32=True), windows


@torch.no_grad()
def input_moments(model: nn.Module, windows: torch.Tensor, layers: set[str]) -> dict[str, torch.Tensor]:
    """``{layer: X^T X / n}`` (float32, ``(in, in)``) for each named linear layer, over ``windows`` run one at a time."""
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}  # layer -> the layer whose matrix it shares
    last: list = [None, None]  # the previous hooked call's input tensor and layer

    def hook(name):
        def record(module, args):
            # q, k and v (gate and up) are called one after another on the very same tensor object;
            # holding that object keeps its memory from being reused by an unrelated later input.
            previous, previous_name = last
            last[:] = [args[0], name]
            if name in alias:
                return
            if args[0] is previous:
                alias[name] = alias.get(previous_name, previous_name)
                return
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            total = sums.get(name)
            sums[name] = x.T @ x if total is None else total.addmm_(x.T, x)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if n in layers]
    try:
        for window in windows:
            model(window[None])
    finally:
        last.clear()
        for h in handles:
            h.remove()
    count = windows.numel()
    moments = {name: total / count for name, total in sums.items()}
    return {name: moments[alias.get(name, name)] for name in layers if alias.get(name, name) in moments}
