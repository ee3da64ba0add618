"""The per-weight quantize function a ``compressor quantize --optimize`` run uses in place of the format's own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import CompressorError
from ..formats.nf4 import FourBitConfig
from . import OptimizeConfig
from .calibration import input_moments, token_windows
from .gptq import quantize_gptq
from .scales import quantize_searched

WeightQuantizer = Callable[[str, torch.Tensor], tuple]


def weight_quantizer(model_dir: Path, cfg, optimize: OptimizeConfig, layers: frozenset[str]) -> WeightQuantizer | None:
    """A function ``(weight name, tensor) -> (packed, state)`` for ``optimize``; None for plain rounding.

    The float model at ``model_dir`` first reads the calibration text, to weigh each layer's error
    by its inputs; a layer the text never reached falls back to an unweighted scale search.
    """
    if optimize.method == "none":
        return None
    if not isinstance(cfg, FourBitConfig):
        raise CompressorError(None, f"--optimize {optimize.method} applies to nf4 and fp4")
    moments = calibrate(model_dir, optimize, layers)

    def quantize(name: str, tensor: torch.Tensor) -> tuple:
        hessian = moments.get(name.removesuffix(".weight"))
        if optimize.method == "gptq" and hessian is not None:
            return quantize_gptq(tensor, cfg, hessian, optimize.damp, optimize.act_order)
        importance = None if hessian is None else hessian.diagonal().expand(tensor.shape)
        return quantize_searched(tensor, cfg, importance)

    return quantize


def calibrate(model_dir: Path, optimize: OptimizeConfig, layers: frozenset[str]) -> dict[str, torch.Tensor]:
    """``{layer: X^T X / n}`` for ``layers`` of the float model at ``model_dir`` over the calibration text."""
    from transformers import AutoTokenizer

    from ..loading import load, quant_method

    if quant_method(model_dir) != "float":
        raise CompressorError(model_dir, "calibration runs the float model: quantize from a float checkpoint")
    model = load(model_dir, exact=True)
    windows = token_windows(AutoTokenizer.from_pretrained(model_dir), optimize.calibration, optimize.calibration_tokens, optimize.seq_len)
    return input_moments(model, windows, set(layers))
