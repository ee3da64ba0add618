"""Runtime modules over quantized weights. They hold a format's state and never quantize."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import formats, memory
from .choices import ACTIVATIONS
from .native.matmul import matmul


class _DequantizedLinear(torch.autograd.Function):
    # x @ W.T where W is dequantized in forward and again in backward: autograd keeps the packed
    # weight (through the module), never a float copy, so training holds one layer's float weight at a time.
    # Under activation checkpointing (module.reuse_in_backward) the forward saves its W instead: the
    # first forward's saved tensors are dropped, and the recomputation's W then serves the backward,
    # so each weight is decoded twice per step rather than three times.

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        # With a compute dtype (bfloat16 training), W is decoded straight to it and the product's
        # result goes back to x's dtype, as bitsandbytes' compute dtype does.
        dtype = module.compute_dtype or x.dtype
        ctx.module, ctx.x_dtype = module, x.dtype
        w = module.weight_dequantized(dtype)
        ctx.save_for_backward(w if module.reuse_in_backward else None)
        bias = None if module.bias is None else module.bias.to(dtype)  # frozen: no gradient
        return linear(x.to(dtype), w, bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        if w is None:
            w = ctx.module.weight_dequantized(grad.dtype)
        return linear(grad.to(w.dtype), w.T).to(ctx.x_dtype), None


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)``, its output from :func:`compressor.memory.empty` (a training step's pool, where one is active)."""
    rows = x.reshape(-1, x.shape[-1])
    out = memory.empty((rows.shape[0], w.shape[0]), x.dtype)
    if bias is None:
        torch.mm(rows, w.T, out=out)
    else:
        torch.addmm(bias, rows, w.T, out=out)
    return out.view(*x.shape[:-1], w.shape[0])


FUSED_MAX_ROWS = 16  # up to this many rows, a format's fused kernel beats dequantize + matmul on CPU


class QuantLinear(nn.Module):
    """A linear layer whose weight stays packed; it is dequantized for each forward.

    ``packed`` and ``state`` come from a format's ``quantize`` (offline). The module keeps them on
    the CPU as they are; the dequantized weight lives only for the duration of one call. Without
    gradients and for a few rows (decoding), a format's fused kernel skips the float weight entirely.
    """

    def __init__(self, packed: torch.Tensor, state, bias: torch.Tensor | None = None, activations: str = "float32"):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
        self.activations = activations  # how the fused product takes its input (float32: exactly)
        self.register_buffer("packed", packed, persistent=False)
        self.state = state
        self.in_features = state.shape[1]
        self.out_features = state.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._kernel = None  # the native kernel's view of the weight, made at the first fused product
        self._states = {}  # the state with another output dtype, by dtype (bfloat16 compute)
        self.reuse_in_backward = False  # training with activation checkpointing: see _DequantizedLinear
        self.compute_dtype: torch.dtype | None = None  # the dtype of the product with gradients; None: the input's

    def kernel_weight(self):
        """The weight as the native matmul reads it (see :func:`compressor.formats.kernel_weight`), or None."""
        if self._kernel is None:
            self._kernel = formats.kernel_weight(self.packed, self.state) or False
        return self._kernel or None

    def weight_dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight, ``(out_features, in_features)``, in ``dtype`` (default: the original one)."""
        state = self.state
        if dtype is not None and dtype != state.dtype:
            # Every format ends its dequantize in state.dtype, and the 4-bit kernels write bfloat16 directly.
            if dtype not in self._states:  # made once: this runs at every forward
                self._states[dtype] = dataclasses.replace(state, dtype=dtype)
            state = self._states[dtype]
        with torch.profiler.record_function("dequantize"):
            return formats.dequantize(self.packed, state, out=memory.empty(state.shape, state.dtype))

    def fused(self, x: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False,
              threads: int | None = None) -> torch.Tensor | None:  # fmt: skip
        """``x @ W.T + b`` in float32 by the native kernel, never materializing ``W`` (no gradients); None where it does not apply.

        With ``out``, the result is written there (or, with ``accumulate``, added to it). The
        activations enter as :attr:`activations` says.
        """
        weight = self.kernel_weight()
        if weight is None:
            return None
        return matmul(x, weight, self.bias, out=out, accumulate=accumulate, threads=threads, activations=self.activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with ``W`` dequantized to ``x``'s dtype; gradients flow to ``x`` only."""
        if not torch.is_grad_enabled() and x.numel() <= FUSED_MAX_ROWS * self.in_features:
            y = self.fused(x)
            if y is not None:
                return y.to(x.dtype)
        return _DequantizedLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={type(self.state).__name__}, activations={self.activations}"
