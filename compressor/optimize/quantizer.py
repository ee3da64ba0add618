"""What a ``compressor quantize --optimize / --budget-bits`` run does before streaming the checkpoint.

The float model reads the calibration text once: its inputs' second moments weigh each layer's
error (:mod:`.scales`, :mod:`.gptq`), and, under a size budget, each layer is quantized up front and
its damage measured (:mod:`.budget`). The run then takes the cached result for each weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CompressorError
from ..formats import format_for
from ..formats.nf4 import FourBitConfig
from . import OptimizeConfig
from .budget import LayerCost, choose, measure
from .calibration import float_model_and_windows, input_moments
from .gptq import quantize_gptq
from .scales import quantize_searched

WeightQuantizer = Callable[[str, torch.Tensor], tuple]


@dataclass
class Prepared:
    """The per-weight quantize function (None: the format's own) and the layers the budget keeps in float."""

    quantize: WeightQuantizer | None = None
    kept: list[LayerCost] = field(default_factory=list)
    measured: list[LayerCost] = field(default_factory=list)  # every layer's cost, when a budget was planned


def prepare(model_dir: Path, cfg, optimize: OptimizeConfig, layers: frozenset[str]) -> Prepared:
    """Calibrate, plan the budget and return how to quantize each weight; nothing to do for plain rounding."""
    if optimize.method == "none" and optimize.budget_bits is None:
        return Prepared()
    if optimize.method != "none" and not isinstance(cfg, FourBitConfig):
        raise CompressorError(None, f"--optimize {optimize.method} applies to nf4 and fp4")
    model, windows = float_model_and_windows(model_dir, optimize.calibration, optimize.calibration_tokens, optimize.seq_len)
    moments = input_moments(model, windows, set(layers)) if optimize.method != "none" else {}
    quantize = _quantizer(cfg, optimize, moments)
    if optimize.budget_bits is None:
        return Prepared(quantize)
    weights = {name: model.get_submodule(name).weight.detach() for name in sorted(layers)}
    cached = {name: quantize(f"{name}.weight", w) for name, w in weights.items()}
    costs = measure(model, windows[: optimize.budget_windows], cached, _stored_bits(model_dir, layers))
    return Prepared(lambda name, tensor: cached[name.removesuffix(".weight")], choose(costs, optimize.budget_bits), costs)


def _quantizer(cfg, optimize: OptimizeConfig, moments: dict[str, torch.Tensor]) -> WeightQuantizer:
    if optimize.method == "none":
        fmt = format_for(cfg)
        return lambda name, tensor: fmt.quantize(tensor, cfg)

    def quantize(name: str, tensor: torch.Tensor) -> tuple:
        # A layer the calibration text never reached falls back to an unweighted scale search.
        hessian = moments.get(name.removesuffix(".weight"))
        if optimize.method == "gptq" and hessian is not None:
            return quantize_gptq(tensor, cfg, hessian, optimize.damp, optimize.act_order)
        importance = None if hessian is None else hessian.diagonal().expand(tensor.shape)
        return quantize_searched(tensor, cfg, importance)

    return quantize


def _stored_bits(model_dir: Path, layers: frozenset[str]) -> dict[str, int]:
    # Each weight's size in the checkpoint (the model itself runs in float32 whatever it was stored in).
    from ..checkpoint.reader import find_checkpoint, open_shard

    bits = {}
    for shard in find_checkpoint(model_dir).shards:
        with open_shard(shard) as reader:
            for key in reader.keys():
                if key.endswith(".weight") and key.removesuffix(".weight") in layers:
                    bits[key.removesuffix(".weight")] = 8 * reader.nbytes(key)
    return bits
