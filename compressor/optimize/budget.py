"""Mixed precision under a size budget: keep unquantized the layers whose quantization hurts most per bit.

Each layer's harm is measured, not guessed: the float model runs the calibration text with that one
layer quantized (as the run will quantize it) and the KL divergence of its next-token distributions
from the float model's is the layer's damage. Layers are then kept, best damage per extra bit first,
while the bits per parameter of all the model's linear layers stay within the budget. Kept layers
stay in the checkpoint's own float dtype (stock transformers loads a tensor in the dtype it is
stored in, and a bfloat16 layer in a float32 model fails), listed in the skip list, so stock
transformers + bitsandbytes loads them as the float layers they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import dequantize, payload_nbytes


@dataclass(frozen=True)
class LayerCost:
    """One layer's measured damage when quantized alone, and its size either way."""

    name: str
    params: int
    quantized_bits: int  # codes and scales
    kept_bits: int  # the float weight as the checkpoint stores it
    kl: float  # mean KL (nats/token) from the float model with only this layer quantized

    @property
    def extra_bits(self) -> int:
        """Bits it costs to keep the layer in float rather than quantized."""
        return self.kept_bits - self.quantized_bits


@torch.no_grad()
def measure(model: nn.Module, windows: torch.Tensor, quantized: dict[str, tuple], stored_bits: dict[str, int]) -> list[LayerCost]:
    """Each layer's :class:`LayerCost`: ``quantized`` maps layer names to their ``(packed, state)``, ``stored_bits`` to their float size."""
    reference = [F.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows]
    costs = []
    for name, (packed, state) in quantized.items():
        layer = model.get_submodule(name)
        original = layer.weight.data
        layer.weight.data = dequantize(packed, state).to(original.dtype)
        try:
            kl = sum(_kl(ref, model(w[None]).logits[0]) for ref, w in zip(reference, windows)) / len(windows)
        finally:
            layer.weight.data = original
        costs.append(LayerCost(name, original.numel(), 8 * payload_nbytes(packed, state), stored_bits[name], kl))
    return costs


def choose(costs: list[LayerCost], budget_bits: float) -> list[LayerCost]:
    """The layers to keep: greedily by damage per extra bit, each one taken only if the total stays within ``budget_bits`` per parameter."""
    total_params = sum(c.params for c in costs)
    room = budget_bits * total_params - sum(c.quantized_bits for c in costs)
    kept = []
    for cost in sorted(costs, key=lambda c: c.kl / max(c.extra_bits, 1), reverse=True):
        if 0 < cost.extra_bits <= room:
            kept.append(cost)
            room -= cost.extra_bits
    return kept


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(logits.float(), -1), reference, log_target=True, reduction="batchmean"))
