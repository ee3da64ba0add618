"""The adapter's input dropout, with a mask that is never stored: a hash of a seed and each element's index.

``torch.nn.Dropout`` draws every element from torch's Mersenne Twister (about 10 ns an element on
this machine: a sixth of a QLoRA step on SmolLM2, for the 7 projections of every layer) and keeps
the mask for the backward. Here the mask comes from a counter-based hash (``compressor/native/ops.c``),
so the backward regenerates it from the seed. The seed is drawn from torch's generator, so
``torch.manual_seed`` fixes the masks and activation checkpointing, which restores the generator
before it recomputes a layer, recomputes the same ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..native.ops import DROPOUT_DTYPES
from ..native.ops import dropout as native_dropout


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        ctx.seed, ctx.p = int(torch.randint(0, 2**63 - 1, ())), p
        return native_dropout(x, ctx.seed, p, torch.empty_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        return native_dropout(grad, ctx.seed, ctx.p, torch.empty_like(grad)), None


class Dropout(nn.Module):
    """Dropout with probability ``p`` in training; the native hashed mask for contiguous float32 or bfloat16 input, torch's elsewhere."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with each element zeroed with probability ``p`` and the rest scaled by ``1 / (1 - p)``."""
        if not self.training or self.p == 0:
            return x
        with torch.profiler.record_function("dropout"):
            if x.dtype in DROPOUT_DTYPES and x.is_contiguous():
                return _HashDropout.apply(x, self.p)
            return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"
