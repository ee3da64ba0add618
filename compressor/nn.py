"""Runtime modules over quantized weights. They hold a format's state and never quantize."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import formats


class QuantLinear(nn.Module):
    """A linear layer whose weight stays packed; it is dequantized for each forward.

    ``packed`` and ``state`` come from a format's ``quantize`` (offline). The module keeps them on
    the CPU as they are; the dequantized weight lives only for the duration of one call.
    """

    def __init__(self, packed: torch.Tensor, state, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("packed", packed, persistent=False)
        self.state = state
        self.in_features = state.shape[1]
        self.out_features = state.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def weight_dequantized(self) -> torch.Tensor:
        """The float weight, ``(out_features, in_features)`` in the original dtype."""
        return formats.dequantize(self.packed, self.state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with ``W`` dequantized to ``x``'s dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_dequantized().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={type(self.state).__name__}"
